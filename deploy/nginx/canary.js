// The canary split of `make release` (release.py), decided per request from a state file, so a
// release never reloads nginx: a reload's old worker processes close their idle keep-alive
// connections, and a request a client sends on one at that instant is lost (connection closed
// without an answer; it cost 2 of ~1,000 requests in one release under 8 connections).
// The file ($canary_state) holds {"version": "2.0", "share": 12.5}, written whole by
// proxy.set_canary (a rename); missing, unreadable or share 0: no canary.
var fs = require('fs');

// "" (no canary running), or "<arm> <version>": arm 1 for the share of requests drawn for the
// canary, 0 for the rest (they go to the default version and are the canary's comparison).
function arm(r) {
    var state, path = r.variables.canary_state;
    try {
        // A plain small file only: reading a FIFO would block the worker, a large one slow it.
        var found = fs.statSync(path);
        if (!found.isFile() || found.size > 4096) {
            return '';
        }
        state = JSON.parse(fs.readFileSync(path));
    } catch (e) {
        return '';
    }
    if (typeof state.version != 'string' || !/^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$/.test(state.version)
            || typeof state.share != 'number' || !(state.share > 0)) {
        return '';
    }
    return (Math.random() * 100 < state.share ? '1 ' : '0 ') + state.version;
}

export default {arm};

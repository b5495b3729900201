#!/usr/bin/env bash
# Pack what `make gpu-check` needs beyond a CUDA machine's own PyTorch image, for a machine with no
# network and no Java:
#   OUT/wheels/   TorchServe, its archiver, captum, pyyaml, psutil, python-multipart: the versions requirements.txt
#                 pins, for Python PYVER (default 3.12) on x86-64 Linux. TorchServe's wheel without
#                 its 46 MB frontend jar, whose entries for x86-64 Linux travel as one solid .tar.xz (16 MB)
#   OUT/jre/      a Java 17 runtime cut down with jlink to the modules TorchServe uses, as .tar.xz
#                 pieces (17 MB)
#   OUT/install.sh  run there from the repo root: a venv (default .venv-gpu) that sees the
#                 machine's torch (also where that python3 is itself a venv's), the wheels installed
#                 into it, the jar rebuilt entry for entry, the JRE unpacked into it
# The whole pack is about 38 MB; each folder stays under 60 MB, so each fits one transfer.
#   bench/pack_offline.sh pack            # here (needs pip's index and a JDK 17 with jlink)
#   bash pack/install.sh && . .venv-gpu/env && make gpu-check VENV=.venv-gpu GPU_OUT=...   # there
set -euo pipefail
out=${1:?usage: bench/pack_offline.sh OUT [PYVER]}
pyver=${2:-3.12}
root=$(cd "$(dirname "$0")/.." && pwd)
limit=$((60 * 1000 * 1000))

pin() { grep -i "^$1==" "$root/requirements.txt"; }
rm -rf "$out/wheels" "$out/jre"
mkdir -p "$out/wheels" "$out/jre"
# --no-deps: the CUDA image has torch, numpy, Pillow, requests, packaging; these are what it lacks.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_28_x86_64 -d "$out/wheels" \
  "$(pin torchserve)" "$(pin torch-model-archiver)" "$(pin captum)" "$(pin pyyaml)" \
  "$(pin psutil)" "$(pin python-multipart)"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The frontend jar out of TorchServe's wheel: its entries, in order (ENTRIES), as one solid xz.
wheel=$(ls "$out"/wheels/torchserve-*.whl)
python3 - "$wheel" "$tmp/jar" <<'PY'
import sys, zipfile
from pathlib import Path
wheel, folder = Path(sys.argv[1]), Path(sys.argv[2])
jar_name = "ts/frontend/model-server.jar"
with zipfile.ZipFile(wheel) as src:
    jar = src.read(jar_name)
    entries = [i for i in src.infolist() if i.filename != jar_name]
    blobs = {i.filename: src.read(i) for i in entries}
with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in entries:
        dst.writestr(info, blobs[info.filename])
(folder / "tree").mkdir(parents=True)
(folder / "model-server.jar").write_bytes(jar)
# Native libraries for other systems than x86-64 Linux stay behind (the pack is for that one).
keep = ("linux_x86_64", "epoll_x86_64", "/linux64/")
with zipfile.ZipFile(folder / "model-server.jar") as z:
    names = [n for n in z.namelist() if not n.startswith("META-INF/native/") or n.endswith("/")
             or any(k in n for k in keep)]
    z.extractall(folder / "tree", members=names)
(folder / "tree" / "ENTRIES").write_text("\n".join(names) + "\n")
PY
tar -C "$tmp/jar/tree" -cf - . | xz -9e -T0 > "$out/wheels/model-server.jar.tar.xz"
jre=$tmp
jlink --add-modules java.base,java.logging,java.management,java.naming,java.sql,java.xml,java.desktop,jdk.unsupported,jdk.crypto.ec,java.net.http \
  --compress=0 --no-header-files --no-man-pages --strip-debug --output "$jre/jre"
tar -C "$jre" -cf - jre | xz -9e -T0 | split -b 50M -d - "$out/jre/jre.tar.xz.part-"

cat > "$out/install.sh" <<'EOF'
#!/usr/bin/env bash
# Install the pack into VENV (default .venv-gpu), from the repo root, with no network. The venv
# sees the system's packages (the CUDA image's torch); `. VENV/env` puts its Java on the PATH.
set -euo pipefail
pack=$(cd "$(dirname "$0")" && pwd)
venv=${1:-.venv-gpu}
if [ -d "$pack/wheels" ]; then
  python3 -m venv --system-site-packages "$venv"
  "$venv/bin/python" -m pip install -q --no-index --no-deps "$pack"/wheels/*.whl
  # A python3 that is itself a venv's (a CUDA image's /opt/.../.venv): its packages, torch among
  # them, are not the "system" ones, so the new venv gets a .pth naming them.
  parent=$(python3 -c 'import sys, site; print(*site.getsitepackages() if sys.prefix != sys.base_prefix else [], sep="\n")')
  own=$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
  [ -z "$parent" ] || printf '%s\n' "$parent" > "$own/parent-venv.pth"
  # The frontend jar, rebuilt from its entries in their order (ENTRIES names the directories too).
  mkdir -p "$venv/jar" && xz -dc "$pack/wheels/model-server.jar.tar.xz" | tar -C "$venv/jar" -xf -
  "$venv/bin/python" - "$venv/jar" "$own/ts/frontend/model-server.jar" <<'PY'
import sys, zipfile
from pathlib import Path
tree, jar = Path(sys.argv[1]), Path(sys.argv[2])
jar.parent.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(jar, "w", zipfile.ZIP_DEFLATED) as z:
    for name in (tree / "ENTRIES").read_text().splitlines():
        if name.endswith("/"):
            z.writestr(name, b"")
        else:
            z.write(tree / name, name)
PY
  rm -rf "$venv/jar"
  touch "$venv/bin/torchserve"  # newer than requirements.txt: make does not reinstall
fi
if compgen -G "$pack/jre/jre.tar.xz.part-*" >/dev/null; then
  mkdir -p "$venv"
  cat "$pack"/jre/jre.tar.xz.part-* | tar -C "$venv" -xJf -
fi
printf 'export JAVA_HOME=%s\nexport PATH=%s:$PATH\n' "$(cd "$venv" && pwd)/jre" \
  "$(cd "$venv" && pwd)/jre/bin" > "$venv/env"
"$venv/jre/bin/java" -version 2>&1 | head -n 1
"$venv/bin/python" -c "import torch, ts, model_archiver; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
EOF
chmod +x "$out/install.sh"

for folder in "$out/wheels" "$out/jre"; do
  size=$(du -sb "$folder" | cut -f1)
  echo "$folder: $((size / 1000000)) MB"
  [ "$size" -le "$limit" ] || { echo "$folder is over 60 MB: split it"; exit 1; }
done

"""What one batch may cost on the machine that serves, and which of its requests fit in it.

TorchServe fails a batch that runs past `responseTimeout` and restarts its worker, so no batch
may get near it. The start-up calibration (runtimes.calibrate) gives what one view of one image
through the served forward and one image's Integrated Gradients cost; a batch may cost
`budget_share` of responseTimeout by these figures, and the handler asks, in ``order``, whether
each request ``fits`` before decoding it:

  1. the oldest prediction (else explanation) first: every request that fits a batch alone is
     served once it is the oldest of its kind. Where the largest legal request costs more than
     the budget, it alone may (``stretched``), and then the batch admits nothing else, so
     predictions never queue behind long batches (a 64-image flood at AVX2 speed held good
     requests 7.9 s at p99 when every batch got the stretched figure);
  2. predictions: images x forward ms x the TTA forwards an image takes on average here;
  3. explanations: images x (Integrated Gradients + forward), together at most `explain_share`.
Within 2 and 3 the lightest go first (fewest images, then bytes), so one small image is not
refused for 64-image requests that arrived before it.

Time spent on the batch so far (reading, decoding) counts, and reruns of a failed group too
(``Admission.again``). Every figure is the worker thread's CPU time on a CPU (deadline.work_clock)
and wall time on a GPU. A refused request is not decoded: 503 with Retry-After (the longest a
batch may take); one that alone costs more than a batch may is its 413 naming what fits.
"""
import json
import logging
import math
import time
from dataclasses import dataclass

from cifar10_serve.deadline import work_clock
from cifar10_serve.errors import Failure

logger = logging.getLogger(__name__)
# TorchServe's own responseTimeout (seconds) where model-config.yaml names none.
TORCHSERVE_RESPONSE_TIMEOUT = 120
# Forwards an image takes when its TTA runs (net.tta_views): plain; + mirror; + two shifts, each
# with its mirror.
VIEWS = {0: 1, 1: 2, 2: 6}


@dataclass
class Costs:
    forward_ms: float  # one view of one image through the served forward
    ig_ms: float       # one image's Integrated Gradients (ig_steps forward+backward passes)
    views: int = 1     # forwards an image takes when every TTA view runs

    def most_ms(self, kind):
        """One image's most: every TTA view, and Integrated Gradients to explain."""
        return self.forward_ms * self.views + (self.ig_ms if kind == "explain" else 0.0)


def headroom_cap(response_timeout, max_decode_ms):
    """The most a batch may be budgeted (s): half of responseTimeout stays headroom after one
    request's decoding, the most a batch can run past its budget."""
    return response_timeout / 2 - max_decode_ms / 1000


def batch_seconds(response_timeout, share, max_decode_ms):
    """``share`` of ``response_timeout``; ValueError naming the settings past the cap."""
    seconds = share * response_timeout
    if seconds > headroom_cap(response_timeout, max_decode_ms):
        raise ValueError(
            f"model-config.yaml: budget_share {share} x responseTimeout {response_timeout} s "
            f"= {seconds:g} s per batch, plus max_decode_ms {max_decode_ms} ms, must leave half "
            f"of responseTimeout as headroom: lower budget_share or max_decode_ms, or raise "
            f"responseTimeout")
    return seconds


def stretched(seconds, costs, limits, response_timeout, max_decode_ms):
    """The budget stretched, on a slow machine, to fit the largest legal request (a legal request is
    served on any CPU), never past the headroom cap (then a warning: those get their 413)."""
    needed = max(limits.get("max_images", 0) * costs.most_ms("predict"),
                 limits.get("max_explain_images", 0) * costs.most_ms("explain")) / 1000
    cap = headroom_cap(response_timeout, max_decode_ms)
    if needed > cap:
        logger.warning("the largest requests the limits allow could cost %.1f s here, more than "
                       "the %.1f s a batch may take within responseTimeout %s s: they will get "
                       "a 413; lower max_explain_images or ig_steps (or max_images), or raise "
                       "responseTimeout", needed, cap, response_timeout)
    return max(seconds, min(needed, cap))


class Budget:
    """Admits a batch's Rows while their estimated cost fits ``seconds``; a batch's first request
    alone up to ``most``. ``timed``: how the costs were timed (describe's figures)."""

    def __init__(self, costs, seconds, explain_share=0.5, limits=None, clock=None, most=None,
                 timed=None, wall=None):
        self.costs, self.seconds, self.explain_share = costs, seconds, explain_share
        # Wall-clock seconds of a batch after which no more of it is decoded (None: no bound):
        # on a CPU shared with other processes the wall clock outruns the worker's CPU time,
        # and TorchServe kills a worker by the wall clock.
        self.wall = wall
        self.most = max(seconds, most or seconds)
        self.limits, self.clock, self.timed = limits or {}, clock or work_clock(), timed
        self.images = self.looked = 0  # images predicted so far here, and how many took TTA

    def saw(self, images, looked):
        self.images += images
        self.looked += looked

    def forwards(self):
        """Forwards an image takes on average here (every view until any image is seen)."""
        share = self.looked / self.images if self.images else 1.0
        return 1 + (self.costs.views - 1) * share

    def cost(self, row, forwards=None):
        forward = self.costs.forward_ms * (self.forwards() if forwards is None else forwards)
        per_image = forward + (self.costs.ig_ms if row.kind == "explain" else 0.0)
        return len(row.images) * per_image / 1000

    def largest(self, kind):
        """The most images a request of ``kind`` may carry: what fits alone, and the limit."""
        per_image = self.costs.most_ms(kind) / 1000
        fits = math.floor(self.most / per_image) if per_image > 0 else math.inf
        limit = self.limits.get("max_explain_images" if kind == "explain" else "max_images")
        return min(fits, limit or math.inf)

    @property
    def retry_after(self):
        """Whole seconds: the longest a batch takes."""
        return max(1, math.ceil(self.most))

    def admission(self, rows, started, together=False, wall_started=None):
        return Admission(self, rows, started, together, wall_started)

    def refuse(self, row, code, images=None, cost=None):
        """The row's 503, or its 413 (``images`` could cost ``cost`` s), undecoded."""
        kind = "explanation" if row.kind == "explain" else "prediction"
        if code == 413:
            message = (f"this {kind} request's {images} images could cost {cost:.1f} s on this "
                       f"server, more than the {self.most:.1f} s a batch may take: send at "
                       f"most {self.largest(row.kind)} images per {kind} request")
        else:
            share = (f" (explanations get at most {self.explain_share:.0%} of it)"
                     if row.kind == "explain" else "")
            message = (f"the server is busy: the requests before this one take this batch's "
                       f"{self.seconds:.1f} s of work{share}; send it again after the "
                       f"Retry-After header's {self.retry_after} s")
        row.error, row.images = (code, message), []

    def figures(self):
        return {"forward_ms_per_image": round(self.costs.forward_ms, 3),
                "tta_views": self.costs.views, "forwards_per_image": round(self.forwards(), 3),
                "explain_ms_per_image": round(self.costs.ig_ms, 1),
                "batch_budget_s": round(self.seconds, 3),
                "first_request_budget_s": round(self.most, 3), "explain_share": self.explain_share,
                "largest_request_images": {"predict": self.largest("predict"),
                                           "explain": self.largest("explain")},
                "retry_after_s": self.retry_after, **({"timed": self.timed} if self.timed else {})}


class Admission:
    """Which rows of one batch the budget admits: for each in ``order``, whether it ``fits`` (then
    it is decoded), and after a failed group whether its rerun fits ``again``; a row that does not
    carries its 503 or 413. ``together``: one request's instances, admitted or refused as one."""

    def __init__(self, budget, rows, started, together=False, wall_started=None):
        self.budget, self.started, self.together = budget, started, together
        # time.monotonic() when the batch began (its reading counts, as for ``started``)
        self.wall_started = time.monotonic() if wall_started is None else wall_started
        working = [row for row in rows if row.error is None and row.kind in ("predict", "explain")]
        self.admitted = []  # (row, its estimated cost), in the order admitted
        if together:
            self.order = working
            self.images = sum(len(row.images) for row in working)
            self.most = sum(budget.cost(row, budget.costs.views) for row in working)
            return
        kinds = [[row for row in working if row.kind == kind] for kind in ("predict", "explain")]
        first = (kinds[0] or kinds[1])[:1]
        self.order = first + [row for rows in kinds for row in sorted(rows, key=_weight)
                              if not (first and row is first[0])]

    def spent(self):
        return self.budget.clock() - self.started

    def fits(self, row):
        """Whether ``row`` fits (else it has its 503, or 413); what was admitted counts unless it
        failed to decode."""
        budget = self.budget
        images, most = ((self.images, self.most) if self.together
                        else (len(row.images), budget.cost(row, budget.costs.views)))
        if most > budget.most:
            budget.refuse(row, 413, images, most)
            return False
        if self.together:
            return True
        cost = budget.cost(row)
        live = [(r, c) for r, c in self.admitted if r.error is None]
        reserved = sum(c for _, c in live)
        explaining = sum(c for r, c in live if r.kind == "explain")
        over = self.spent() + reserved + cost > budget.seconds
        if row.kind == "explain":
            over = over or explaining + cost > budget.explain_share * budget.seconds
        if over and row is not self.order[0]:
            budget.refuse(row, 503)
            return False
        self.admitted.append((row, cost))
        return True

    def in_time(self, row):
        """Whether the batch has run (wall clock) at most budget.wall, so that ``row`` may start
        its decoding or its explanation; else the row's prompt 503 (with Retry-After), rather
        than TorchServe killing the worker, and the whole batch, at responseTimeout."""
        ran = time.monotonic() - self.wall_started
        if self.budget.wall is None or ran <= self.budget.wall:
            return True
        row.error, row.images = Failure(
            503, f"the server is busy: its CPU is shared, and this request's batch had run "
                 f"{ran:.1f} s (wall clock) before its turn, past the {self.budget.wall:.1f} s "
                 f"after which a batch starts no more work; retry", ""), []
        return False

    def again(self, row):
        """Whether a rerun fits what is left, the failed group's time included; else 503."""
        if self.spent() + self.budget.cost(row) <= self.budget.seconds:
            return True
        self.budget.refuse(row, 503)
        return False


def for_worker(settings, response_timeout, calibration):
    """A worker's Budget from its Calibration; its figures logged."""
    limits, decode_ms = settings.limits, settings.limits["max_decode_ms"]
    seconds = batch_seconds(response_timeout, settings.budget_share, decode_ms)
    costs = Costs(calibration.forward_ms, calibration.ig_ms, VIEWS[settings.tta])
    most = stretched(seconds, costs, limits, response_timeout, decode_ms)
    found = Budget(costs, seconds, settings.explain_share, limits, calibration.clock, most,
                   calibration.figures(), wall=headroom_cap(response_timeout, decode_ms))
    logger.info("batch budget %.2f s (responseTimeout %s s x budget_share %s), runtime %s: %s",
                seconds, response_timeout, settings.budget_share, calibration.runtime,
                json.dumps(found.figures()))
    return found


def _weight(row):
    """Images, then encoded bytes (v2 UINT8 pixels, already tensors, decode for free)."""
    return len(row.images), sum(len(image) for image in row.images if isinstance(image, bytes))

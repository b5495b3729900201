"""What one batch may cost on the machine that serves, and which of its requests fit in it.

TorchServe fails a batch that runs past the model's `responseTimeout` and restarts its worker, so
no batch may be allowed to get near it, whatever mix of requests it holds. The worker's start-up
calibration (runtimes.calibrate: on this CPU or GPU, on the model spec's input shape) gives what
one view of one image through the served forward costs and what one image's Integrated Gradients
costs. A batch may cost `budget_share` of responseTimeout by these figures (``batch_seconds``),
and in each batch the handler asks its Admission (``Budget.admission``), in its ``order``, whether
each request ``fits`` before decoding it; requests are admitted while their estimated cost fits,
in this order:

  1. the batch's oldest prediction, or where it holds none its oldest explanation: every request
     that fits a batch alone is served once it is the oldest of its kind waiting. On a slow
     machine, where the largest request the limits allow costs more than the budget, this request
     alone may cost that much (``stretched``, ``Budget.most``), and such a batch admits nothing
     else: a batch holding more than one request stays within the budget, so predictions never
     queue behind batches longer than it (a 64-image flood at an AVX2-speed forward held good
     requests 7.9 s at p99 when the stretched figure was every batch's), and a prediction is
     never refused for an explanation that arrived before it (10 of 5,015 good ones were, there);
  2. predictions (/predictions, v2, KServe): images x forward ms x the TTA forwards an image takes
     on average here (1 + its extra views x the share of images that took them so far);
  3. explanations: images x (Integrated Gradients ms + the forward), all of them together at most
     `explain_share` of the budget, so that explanations can neither crowd predictions out of a
     batch nor hold them long.
Within 2 and 3 the lightest go first (fewest images, then fewest bytes to decode; arrival order
among equals): a request of one small image is not refused because 64-image requests or bodies
slow to decode happened to arrive before it in the same batch.

The time already spent on the batch (reading its requests, decoding those admitted before) counts
against the budget, so a request slow to decode leaves less for those after it; decoding itself is
bounded by `max_decode_ms`. Where a group of forwards fails and its requests are run again one by
one (predict.run), each rerun is charged too: run only while it fits what is left of the batch's
budget (``Admission.again``), else that request's 503. On a CPU every figure, the calibration's
and the batch's, is the worker thread's CPU time (deadline.work_clock, which says why that one),
as the decoding deadline's is; on a GPU, wall time. A request refused for the budget is not
decoded and is answered as soon as its batch ends: 503 with a Retry-After header (the longest a
batch may take), which clients resend after. One
that alone costs more than a batch may (estimated with every image taking every TTA view) is its
413 naming the largest request that fits alone.
"""
import logging
import math
from dataclasses import dataclass

from cifar10_serve.deadline import work_clock

logger = logging.getLogger(__name__)
# TorchServe's own responseTimeout (seconds) where model-config.yaml names none.
TORCHSERVE_RESPONSE_TIMEOUT = 120
# Forwards an image takes when its TTA runs (net.tta_views): plain; + mirror; + two shifts, each
# with its mirror.
VIEWS = {0: 1, 1: 2, 2: 6}


@dataclass
class Costs:
    """What work costs on this machine (from the start-up calibration)."""
    forward_ms: float  # one view of one image through the served forward
    ig_ms: float       # one image's Integrated Gradients (ig_steps forward+backward passes)
    views: int = 1     # forwards an image takes when every TTA view runs

    def most_ms(self, kind):
        """The most one image of a ``kind`` ("predict", "explain") request can cost: every TTA
        view, and Integrated Gradients for an explanation."""
        return self.forward_ms * self.views + (self.ig_ms if kind == "explain" else 0.0)


def headroom_cap(response_timeout, max_decode_ms):
    """The most a batch may be budgeted (s): what leaves half of responseTimeout as headroom
    after one request's decoding, the most a batch can run past its budget."""
    return response_timeout / 2 - max_decode_ms / 1000


def batch_seconds(response_timeout, share, max_decode_ms):
    """What a batch may cost by the start-up timings: ``share`` of ``response_timeout`` (s).
    ValueError, naming the settings, where that plus one request's decoding (the most the batch
    can run past its budget: decoding is timed as it happens) leaves less than half of
    responseTimeout for the timings being off (a busier machine, a slower batch than timed)."""
    seconds = share * response_timeout
    if seconds > headroom_cap(response_timeout, max_decode_ms):
        raise ValueError(
            f"model-config.yaml: budget_share {share} x responseTimeout {response_timeout} s "
            f"= {seconds:g} s per batch, plus max_decode_ms {max_decode_ms} ms, must leave half "
            f"of responseTimeout as headroom: lower budget_share or max_decode_ms, or raise "
            f"responseTimeout")
    return seconds


def stretched(seconds, costs, limits, response_timeout, max_decode_ms):
    """The batch budget stretched, where this machine is slow, to fit the largest request the
    limits allow (``max_images`` with every TTA view, ``max_explain_images`` explained): a legal
    request is served, not refused with a 413, on any CPU. Never past what leaves half of
    responseTimeout as headroom; where even that is short (logged as a warning naming the
    settings), the largest requests get their 413 naming what fits."""
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
    """Admits a batch's requests (cifar10_serve.bodies.Row) while their estimated cost fits
    ``seconds``; a batch's first request alone up to ``most`` (``stretched``'s figure; default
    ``seconds``). See the module docstring. ``clock``: the calibration's (deadline.work_clock;
    tests pass their own); ``timed``: how the costs were timed (describe's figures)."""

    def __init__(self, costs, seconds, explain_share=0.5, limits=None, clock=None, most=None,
                 timed=None):
        self.costs, self.seconds, self.explain_share = costs, seconds, explain_share
        self.most = max(seconds, most or seconds)
        self.limits, self.clock, self.timed = limits or {}, clock or work_clock(), timed
        self.images = self.looked = 0  # images predicted so far here, and how many took TTA

    def saw(self, images, looked):
        """Count a batch's images and how many of them took the extra TTA views."""
        self.images += images
        self.looked += looked

    def forwards(self):
        """Forwards an image takes on average: 1 + its extra views x the share of images here
        that took them (all of them, until any image has been seen)."""
        share = self.looked / self.images if self.images else 1.0
        return 1 + (self.costs.views - 1) * share

    def cost(self, row, forwards=None):
        """Seconds the row's images are estimated to cost (``forwards`` per image; default the
        average here)."""
        forward = self.costs.forward_ms * (self.forwards() if forwards is None else forwards)
        per_image = forward + (self.costs.ig_ms if row.kind == "explain" else 0.0)
        return len(row.images) * per_image / 1000

    def largest(self, kind):
        """The most images a request of ``kind`` ("predict", "explain") may carry: what fits a
        batch alone with every image taking every TTA view, and the configured limit."""
        per_image = self.costs.most_ms(kind) / 1000
        fits = math.floor(self.most / per_image) if per_image > 0 else math.inf
        limit = self.limits.get("max_explain_images" if kind == "explain" else "max_images")
        return min(fits, limit or math.inf)

    @property
    def retry_after(self):
        """Whole seconds after which a refused request is worth sending again: the longest a
        batch takes."""
        return max(1, math.ceil(self.most))

    def admission(self, rows, started, together=False):
        """The Admission of a batch of ``rows`` begun at ``started`` (on ``clock``)."""
        return Admission(self, rows, started, together)

    def refuse(self, row, code, images=None, cost=None):
        """The row's 503, or its 413 (``images`` in its request could cost ``cost`` s), as
        ``row.error``; its images dropped undecoded."""
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
        """The derived figures, as the worker logs them and the management API describes."""
        return {"forward_ms_per_image": round(self.costs.forward_ms, 3),
                "tta_views": self.costs.views, "forwards_per_image": round(self.forwards(), 3),
                "explain_ms_per_image": round(self.costs.ig_ms, 1),
                "batch_budget_s": round(self.seconds, 3),
                "first_request_budget_s": round(self.most, 3), "explain_share": self.explain_share,
                "largest_request_images": {"predict": self.largest("predict"),
                                           "explain": self.largest("explain")},
                "retry_after_s": self.retry_after, **({"timed": self.timed} if self.timed else {})}


class Admission:
    """Which requests of one batch (rows of cifar10_serve.bodies.Row, begun at ``started`` on
    the budget's clock) the budget admits. The handler asks, for each row in ``order`` (those that
    need work: the batch's leading request, then the lightest first; see the module docstring),
    whether it ``fits`` and decodes it if so; after a failed group of forwards, whether a row's
    rerun fits ``again``. A row that does not fit carries its 503, or 413, as ``row.error``.
    ``together``: the rows are one request's instances (a KServe envelope), admitted or refused
    as one."""

    def __init__(self, budget, rows, started, together=False):
        self.budget, self.started, self.together = budget, started, together
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
        """Seconds of the budget's clock since the batch began."""
        return self.budget.clock() - self.started

    def fits(self, row):
        """Whether ``row`` (the next of ``order``) fits the batch: then decode it; else it has
        its 503, or its 413 where it alone costs more than a batch may. What was admitted before
        counts unless it failed to decode (a row with an error costs nothing more)."""
        budget = self.budget
        if self.together:
            if self.most > budget.most:
                budget.refuse(row, 413, self.images, self.most)
                return False
            return True
        cost, most = budget.cost(row), budget.cost(row, budget.costs.views)
        if most > budget.most:
            budget.refuse(row, 413, len(row.images), most)
            return False
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

    def again(self, row):
        """Whether running ``row`` once more (its group of forwards failed) fits what is left of
        the batch's budget after the time spent so far, the failed group's included; if not, the
        row has its 503 (the server did not get to it; it may well succeed when resent)."""
        if self.spent() + self.budget.cost(row) <= self.budget.seconds:
            return True
        self.budget.refuse(row, 503)
        return False



def for_worker(settings, response_timeout, calibration):
    """A worker's Budget from its start-up calibration (runtimes.Calibration: the served forward's
    and one image's Integrated Gradients' cost here, and the clock they were timed on); its
    figures logged."""
    limits, decode_ms = settings.limits, settings.limits["max_decode_ms"]
    seconds = batch_seconds(response_timeout, settings.budget_share, decode_ms)
    costs = Costs(calibration.forward_ms, calibration.ig_ms, VIEWS[settings.tta])
    most = stretched(seconds, costs, limits, response_timeout, decode_ms)
    found = Budget(costs, seconds, settings.explain_share, limits, calibration.clock, most,
                   calibration.figures())
    largest = found.largest("predict"), found.largest("explain")
    alone = (f"; a batch's first request alone up to {found.most:.2f} s, what the largest "
             f"request allowed needs here" if found.most > seconds else "")
    logger.info("batch budget %.2f s (responseTimeout %s s x budget_share %s%s), timed here on "
                "the %s, %d images of %s a batch, median of a few runs: forward %.3f ms per "
                "image and view (%s, tta %d: up to %d views; runs %.3f-%.3f), Integrated "
                "Gradients %.0f ms per image (%d steps; runs %.0f-%.0f); the largest request "
                "that fits: %s images to predict, %s to explain; explanations at most %.0f%% of "
                "a batch; refused requests get 503 with Retry-After %d s", seconds,
                response_timeout, settings.budget_share, alone, calibration.clock_name,
                calibration.batch, "x".join(map(str, calibration.input_shape)),
                costs.forward_ms, calibration.runtime, settings.tta, costs.views,
                *calibration.forward_spread, costs.ig_ms, settings.ig_steps,
                *calibration.ig_spread, *largest, 100 * found.explain_share, found.retry_after)
    return found


def _weight(row):
    """How heavy a request is before decoding: its images, then its encoded bytes (v2 UINT8
    pixels, already tensors, decode for free)."""
    return len(row.images), sum(len(image) for image in row.images if isinstance(image, bytes))

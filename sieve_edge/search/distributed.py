"""Candidate scoring on a Ray cluster: the ``score(candidates, budget)`` seam, spread over actors.

``RayWorkers`` says where (``--ray auto|ADDRESS`` joins a running cluster, ``--workers N``
alone starts a local one) and how many. For one search, ``RayWorkers.share`` puts what the
actors cannot read from disk into Ray's object store (the model when it was handed in
memory, the decompositions when there is no calibrate folder), then ``RayEvaluator`` starts
the actors. Each actor builds what the single-process search has, once: the model (loaded
from its folder, or taken from the object store), its ``SearchLinear`` bases from the
calibrate stage's folder, and a ``CandidateEvaluator`` on the driver's pre-tokenized
validation split; then it scores one candidate per call, racing included.

Determinism: a candidate's evaluation depends on its ranks only, never on which actor scored
it or when, and ``RayEvaluator.score`` returns the evaluations in candidate order, so the GA
sees the same sequence as with one process: the same seed gives the same plan at any worker
count. Candidates go to whichever actor is idle (racing makes their costs uneven).

Faults: an actor that dies (its node lost, the process killed) is restarted by Ray
(``max_restarts``) and reloads the model; the candidate it held is put back in the queue and
scored again by the next idle actor. Results are keyed by candidate index and taken once, so
nothing is counted twice. The driver keeps the GA and writes the search state after every
generation as before: a killed driver resumes as a single-process search does.

Ray is optional (``pip install 'sieve-edge[ray]'``); without it asking for workers is a
``BackendMissingError`` with that line. ``ray`` is imported inside functions only.
"""
from __future__ import annotations

import bisect
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from ..errors import BackendMissingError, InputError, SieveEdgeError

RAY_INSTALL = "pip install 'sieve-edge[ray]'"
# tests only: "G:C" makes the worker that gets the C-th candidate of the G-th generation-sized
# batch (a score() of several candidates) exit while holding it, once
KILL_WORKER_ENV = "SIEVE_EDGE_KILL_WORKER"
MAX_RESTARTS = 3


def require_ray():
    """The ray module, or a clear error with the install line."""
    try:
        import ray
    except ImportError:
        raise BackendMissingError("ray", RAY_INSTALL) from None
    return ray


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class RayWorkers:
    """Where candidates are scored: ``address`` ("auto" or HOST:PORT of a running cluster;
    None starts a local one) and ``workers`` (actors; default one per node of a joined cluster).

    ``model_spec`` / ``decompositions`` / ``trust_remote_code`` / ``device``: what each actor
    loads from disk (the search stage fills them in; a node needs the same paths, e.g. a
    shared filesystem). Without ``model_spec`` the driver's model travels through the object
    store, without ``decompositions`` the driver's decompositions do.
    """

    address: str | None = None
    workers: int | None = None
    model_spec: str | None = None
    decompositions: str | None = None
    trust_remote_code: bool = False
    device: str | None = None

    def __post_init__(self):
        if self.address is None and self.workers is None:
            raise InputError("Ray scoring needs --workers N (a local cluster) or --ray auto|ADDRESS (a running one)")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise InputError(f"--workers must be >= 1, got {self.workers}")
        if self.address is not None and not str(self.address).strip():
            raise InputError("--ray needs 'auto' or the HOST:PORT of a running Ray cluster's head")

    def with_sources(self, **kw) -> "RayWorkers":
        return replace(self, **kw)

    # -- the cluster
    def connect(self, log: Callable[[str], None]) -> bool:
        """Join or start the cluster; True when this call started Ray (and so shuts it down)."""
        ray = require_ray()
        if ray.is_initialized():
            return False
        if self.address is None:
            n = cpu_count()
            log(f"search: starting a local Ray cluster ({n} CPUs) for {self.workers} workers")
            ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": _worker_env()})
        else:
            log(f"search: joining the Ray cluster at {self.address}")
            try:
                ray.init(address=self.address, log_to_driver=False, runtime_env={"env_vars": _worker_env()})
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise InputError(f"--ray {self.address}: cannot join a Ray cluster there ({' '.join(str(e).split())}); "
                                 "start one with `ray start --head`, or use --workers N alone for a local one") from e
        return True

    def plan(self) -> tuple[int, int, float]:
        """(actors, threads per actor, CPUs each asks Ray for): threads = the cluster's CPUs /
        actors, at least 1; more actors than CPUs share them (a fractional request), rather
        than wait for CPUs that never free up."""
        ray = require_ray()
        cpus = float(ray.cluster_resources().get("CPU", 1))
        if self.workers is not None:
            n = self.workers
        else:
            n = max(1, sum(1 for node in ray.nodes() if node.get("Alive")))
        threads = max(1, int(cpus // n))
        return n, threads, min(float(threads), cpus / n)

    def share(self, model, decompositions, log: Callable[[str], None] | None = None) -> "Shared":
        """Connect, and put in the object store what the actors cannot load from disk.
        Call before the driver attaches its own search modules (the model must be dense)."""
        say = log or (lambda msg: None)
        started = self.connect(say)
        ray = require_ray()
        model_ref = None if self.model_spec else ray.put(model)
        decs_ref = None if self.decompositions else ray.put(dict(decompositions))
        return Shared(self, started, model_ref, decs_ref, say)


def _worker_env() -> dict[str, str]:
    # the actors import sieve_edge as the driver does (a source checkout on PYTHONPATH included)
    keep = ("PYTHONPATH", "SIEVE_EDGE_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME")
    return {k: os.environ[k] for k in keep if k in os.environ}


@dataclass
class Shared:
    """A connected cluster and the object-store references of one search."""

    workers: RayWorkers
    started: bool
    model_ref: object
    decs_ref: object
    log: Callable[[str], None]
    closed: bool = field(default=False)

    def evaluator(self, local, scorer, objective, config, higher_is_better: bool) -> "RayEvaluator":
        return RayEvaluator(self, local, scorer, objective, config, higher_is_better)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.started:
            require_ray().shutdown()


class ScoringWorker:
    """One Ray actor: a model with its search bases and a CandidateEvaluator, built once."""

    def __init__(self, rank: int, payload: dict):
        import torch

        from ..factorize import attach_search_, simulate_int8_
        from .evaluator import CandidateEvaluator

        torch.set_num_threads(payload["threads"])
        self.rank = rank
        if payload["model_spec"]:
            from ..models import load_model

            model = load_model(payload["model_spec"], device=payload["device"],
                               trust_remote_code=payload["trust_remote_code"])
        else:
            import ray

            model = ray.get(payload["model"])  # a reference nested in the payload is not resolved for us
            if payload["device"]:
                from ..models import pick_device

                model = model.to(pick_device(payload["device"]))
        if payload["decompositions"]:
            from ..calibrate import load_decompositions

            decs, _, _ = load_decompositions(Path(payload["decompositions"]))
        else:
            import ray

            decs = ray.get(payload["decs"])
        attach_search_(model.eval(), decs)
        del decs
        config = payload["config"]
        # the driver's seed: racing draws its row order from it, so a worker races as the driver would
        self.evaluator = CandidateEvaluator(model, payload["scorer"], payload["objective"], payload["tol"],
                                            config.race_size, config.race_z, payload["higher"], seed=config.seed)
        if config.weights == "int8":
            simulate_int8_(model)
        self.threads = torch.get_num_threads()
        self.device = str(next(model.parameters()).device)

    def ready(self) -> dict:
        return {"rank": self.rank, "pid": os.getpid(), "threads": self.threads, "device": self.device,
                "dense_metric": self.evaluator.dense_metric}

    def score(self, ranks: dict, die: bool = False):
        if die:
            os._exit(1)  # test hook (KILL_WORKER_ENV): the worker dies mid-generation, holding this candidate
        return self.evaluator(ranks)


class RayEvaluator:
    """``CandidateEvaluator``'s interface over Ray actors: ``score(candidates, budget)`` returns
    the Evaluations in candidate order (a prefix when the budget ran out)."""

    def __init__(self, shared: Shared, local, scorer, objective, config, higher_is_better: bool):
        ray = require_ray()
        self.shared, self.log = shared, shared.log
        self.local = local                   # the driver's evaluator: reference, tolerance, dense timing
        self.tol, self.dense_metric, self.dense_seconds = local.tol, local.dense_metric, local.dense_seconds
        self.n_workers, threads, cpus = shared.workers.plan()
        self.scored = 0
        self.rescheduled = 0
        self.seconds = 0.0
        w = shared.workers
        kill = os.environ.get(KILL_WORKER_ENV, "")
        payload = {
            "threads": threads, "model_spec": w.model_spec, "model": shared.model_ref,
            "decompositions": w.decompositions, "decs": shared.decs_ref, "device": w.device,
            "trust_remote_code": w.trust_remote_code, "scorer": scorer, "objective": objective,
            "config": config, "tol": local.tol, "higher": higher_is_better,
        }
        self.kill_at = tuple(int(x) for x in kill.split(":")) if kill else None
        self.batches = 0
        gpus = 0.0
        if (w.device or "").startswith("cuda"):
            # one GPU per actor, or a share of one when there are more actors than GPUs
            total = float(ray.cluster_resources().get("GPU", 0))
            if total <= 0:
                raise InputError("--device cuda: the Ray cluster has no GPU; use --device cpu for the workers")
            gpus = min(1.0, total / self.n_workers)
        actor = ray.remote(ScoringWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=MAX_RESTARTS,
                                                  max_task_retries=0)
        self._payload = ray.put(payload)  # held: a restarted actor is built from it again
        self.actors = [actor.remote(i, self._payload) for i in range(self.n_workers)]
        self.idle = list(range(self.n_workers))   # workers ready for a candidate
        self.recovering: dict[int, float] = {}    # restarting worker -> when to ask again whether it is back
        self._probes: dict = {}                   # readiness calls still out at the end of a score()
        t0 = time.perf_counter()
        try:
            info = ray.get([a.ready.remote() for a in self.actors])
        except Exception as e:
            self.close()
            raise SieveEdgeError(f"the Ray workers could not load the model and decompositions: "
                                 f"{' '.join(str(e).split())[:600]}") from e
        self.log(f"search: {self.n_workers} Ray workers ready in {time.perf_counter() - t0:.0f} s, "
                 f"{threads} thread(s) each on {info[0]['device']}")
        for i in info:
            if abs(i["dense_metric"] - self.dense_metric) > 1e-9:
                self.log(f"search: warning: worker {i['rank']} scores the dense model {i['dense_metric']:.6f}, the "
                         f"driver {self.dense_metric:.6f} (another device or thread count rounds differently)")

    def __call__(self, ranks):
        got = self.score([ranks])
        if not got:
            raise SieveEdgeError("the Ray workers scored nothing")
        return got[0]

    def confirm(self, ranks: dict):
        """The chosen plan on the whole split, by the driver's own evaluator (the final
        accept/reject is made where the reference and the tolerance live)."""
        return self.local.confirm(ranks)

    def score(self, candidates: Sequence[dict], budget=None) -> list:
        ray = require_ray()
        died = ray.exceptions.ActorDiedError
        lost = (ray.exceptions.RayActorError, getattr(ray.exceptions, "ActorUnavailableError", died))
        t0 = time.perf_counter()
        results: list = [None] * len(candidates)
        pending = list(range(len(candidates)))      # in candidate order, always sorted
        inflight = {ref: (None, w) for ref, w in self._probes.items()}  # ObjectRef -> (candidate or None, worker)
        self._probes = {}
        stopped = False
        self.batches += len(candidates) > 1
        dispatched = 0
        while True:
            while pending and self.idle and not stopped:
                if budget is not None and not budget.allows(self.dense_seconds):
                    stopped = True  # as one process: start a candidate only if a full evaluation still fits
                    break
                i, w = pending.pop(0), self.idle.pop(0)
                dispatched += 1
                die = self.kill_at == (self.batches, dispatched) and len(candidates) > 1
                inflight[self.actors[w].score.remote(candidates[i], die)] = (i, w)
            now = time.perf_counter()
            for w, at in list(self.recovering.items()):
                if at <= now:  # is the restarted actor back? (a call to a restarting one fails at once)
                    del self.recovering[w]
                    inflight[self.actors[w].ready.remote()] = (None, w)
            scoring = any(i is not None for i, _ in inflight.values())
            if not scoring and (stopped or not pending):
                break
            if not self.idle and not inflight and not self.recovering:
                raise SieveEdgeError(f"every Ray worker died (each restarted up to {MAX_RESTARTS} times); the search "
                                     "state holds every finished generation: rerun to resume")
            if not inflight:
                time.sleep(max(0.0, min(self.recovering.values()) - now))
                continue
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5 if self.recovering else None)
            if not done:
                continue
            i, w = inflight.pop(done[0])
            try:
                value = ray.get(done[0])
            except lost as e:
                if i is not None:
                    self.rescheduled += 1
                    bisect.insort(pending, i)
                    self.log(f"search: worker {w} died scoring candidate {i + 1} of {len(candidates)} "
                             f"({type(e).__name__}); the candidate is rescheduled, the worker restarts")
                    self.recovering[w] = time.perf_counter() + 0.5
                elif isinstance(e, died):
                    self.log(f"search: worker {w} is gone for good ({type(e).__name__}); "
                             f"{len(self.idle) + len(self.recovering)} left")
                else:
                    self.recovering[w] = time.perf_counter() + 0.5
                continue
            if i is not None:
                results[i] = value
            self.idle.append(w)
        self._probes = {ref: w for ref, (i, w) in inflight.items()}  # probes of restarting workers, for next time
        out = []
        for r in results:
            if r is None:
                break  # a prefix only: an unscored candidate is never reported
            out.append(r)
        seconds = time.perf_counter() - t0
        self.scored += len(out)
        self.seconds += seconds
        if len(candidates) > 1 and seconds > 0:
            self.log(f"search: {len(out)} candidates in {seconds:.1f} s on {self.n_workers} workers: "
                     f"{len(out) / seconds:.2f} candidates/s ({self.scored / max(self.seconds, 1e-9):.2f} over the "
                     "search)")
        return out

    def close(self) -> None:
        ray = require_ray()
        for a in getattr(self, "actors", []):
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        self.shared.close()

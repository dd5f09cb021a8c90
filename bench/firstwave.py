"""A first wave with nothing known: how late its tasks are seen, and how many polls each costs,
on the policy's fixed schedule (before) and steered (`InferenceTimes.steer`: each wait's later
polls shifted by its own phase, the first time learned moving every wait's next poll to it).

    python -m bench.firstwave [--sizes 1,3,20,100,1000] [--spreads 0,1.5,7.5] [--mean 60]

Virtual time, no servers: the real `Operations.wait` and `WaitSteer` are driven by an event
queue on a simulated clock, the service answering each poll `--answer-s` later, a task done
`inference` after its submit (inference drawn uniformly from mean +- spread; submits spread
over `--submit-spread`). What is measured is what the code decides (when it polls), for sizes
and spreads a 2-core machine could not run in real time. Runs in seconds.

`bench.batch --videos 20 --in-flight 20 --latency 60 --no-tuned` measures the same against
the emulator and a Prefect server (BENCHMARKS.md, "A first wave with nothing known").
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from pydantic import SecretStr

from bench.common import emit, median, p90, run_script, table

MODEL, PID = "m", "p" * 32
T0 = datetime(2026, 12, 7, tzinfo=UTC)


@dataclass
class Wait:
    submitted: float
    inference: float
    op: Any = None
    steer: Any = None
    polls: list[float] = field(default_factory=list)
    token: int = 0
    unsubscribe: Callable[[], None] | None = None
    seen: float | None = None


def simulate(
    n: int,
    *,
    mean: float,
    spread: float,
    submit_spread: float,
    answer_s: float,
    steered: bool,
    seed: int = 1,
) -> list[Wait]:
    """One first wave of `n` waits; each wait's polls and when it saw its task done."""
    from wan_tasks.api.operations import Operations, Sleep
    from wan_tasks.api.policies import PollPolicy
    from wan_tasks.core.inference_times import InferenceTimes

    rng, clock = random.Random(seed), [0.0]
    policy, times = PollPolicy(), InferenceTimes()
    queue: list[tuple[float, int, int, str, int]] = []
    order = itertools.count()
    waits = sorted(
        (
            Wait(rng.uniform(0, submit_spread), rng.uniform(mean - spread, mean + spread))
            for _ in range(n)
        ),
        key=lambda w: w.submitted,
    )

    def at(t: float, i: int, kind: str, token: int) -> None:
        heapq.heappush(queue, (t, next(order), i, kind, token))

    for i, w in enumerate(waits):
        ops = Operations(
            api_key=SecretStr("k"),
            base_url="https://api.test",
            poll=policy,
            clock=lambda: clock[0],
            rng=random.Random(seed * 100_003 + i),
        )
        if steered:
            clock[0] = w.submitted
            w.steer = times.steer(
                policy,
                MODEL,
                5,
                T0 + timedelta(seconds=w.submitted),
                now=lambda: T0 + timedelta(seconds=clock[0]),
                rng=random.Random(seed * 7919 + i),
            )
        # Before: the wait task slept first_poll_after from the submit, then polled on the
        # schedule; steered: the steer plans the first poll too.
        w.op = ops.wait(PID, timeout=3600, poll=policy, steer=w.steer)
        at(w.submitted + (0.0 if steered else policy.first_poll_after), i, "start", 0)

    def step_on(i: int, step: Any) -> None:
        w = waits[i]
        w.token += 1
        if isinstance(step, Sleep):
            token = w.token
            if step.wake is not None:
                w.unsubscribe = step.wake.subscribe(lambda: at(clock[0], i, "wake", token))
            at(clock[0] + step.seconds, i, "timer", token)
        else:
            w.polls.append(clock[0])
            at(clock[0] + answer_s, i, "answer", w.token)

    while queue:
        t, _, i, kind, token = heapq.heappop(queue)
        clock[0] = t
        w = waits[i]
        if w.seen is not None or (kind != "start" and token != w.token):
            continue
        if w.unsubscribe is not None and kind in ("timer", "wake"):
            w.unsubscribe()
            w.unsubscribe = None
        try:
            if kind == "start":
                step = next(w.op)
            elif kind in ("timer", "wake"):
                step = w.op.send(kind == "wake")
            else:
                done = w.polls[-1] >= w.submitted + w.inference
                step = w.op.send(_answer(done, w.inference))
            step_on(i, step)
        except StopIteration:
            w.seen = t
            times.record(MODEL, 5, w.inference)
    return waits


def _answer(done: bool, inference: float) -> httpx.Response:
    data: dict[str, Any] = {"id": PID, "model": MODEL, "status": "processing", "outputs": []}
    if done:
        data.update(
            status="completed",
            outputs=["https://cdn.test/v.mp4"],
            timings={"inference": round(inference * 1000)},
        )
    response = httpx.Response(200, json={"code": 200, "message": "success", "data": data})
    response.request = httpx.Request("GET", f"https://api.test/api/v3/predictions/{PID}/result")
    return response


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes 1, 20, 100 only")
    parser.add_argument("--sizes", default="1,3,20,100,1000")
    parser.add_argument("--spreads", default="0,1.5,7.5", help="inference mean +- these, s")
    parser.add_argument("--mean", type=float, default=60.0, help="mean inference, s")
    parser.add_argument("--submit-spread", type=float, default=2.0, help="submits over, s")
    parser.add_argument("--answer-s", type=float, default=0.2, help="a poll's answer time, s")
    args = parser.parse_args(argv)
    sizes = [1, 20, 100] if args.quick else [int(x) for x in args.sizes.split(",")]
    spreads = [float(x) for x in args.spreads.split(",")]
    rows, data = [], []
    for spread in spreads:
        for n in sizes:
            for steered in (False, True):
                waits = simulate(
                    n,
                    mean=args.mean,
                    spread=spread,
                    submit_spread=args.submit_spread,
                    answer_s=args.answer_s,
                    steered=steered,
                )
                late = [(w.seen or 0.0) - w.submitted - w.inference for w in waits]
                polls = [len(w.polls) for w in waits]
                per_second = Counter(int(t) for w in waits for t in w.polls)
                row = {
                    "spread_s": spread,
                    "waits": n,
                    "steered": steered,
                    "late_median_s": median(late),
                    "late_p90_s": p90(late),
                    "late_max_s": max(late),
                    "polls_median": median(polls),
                    "polls_max": max(polls),
                    "over_6_polls": sum(p > 6 for p in polls),
                    "peak_polls_per_s": max(per_second.values()),
                }
                data.append(row)
                rows.append(
                    [
                        f"{args.mean:g} +- {spread:g}",
                        n,
                        "steered" if steered else "fixed schedule (before)",
                        f"{row['late_median_s']:.2f} / {row['late_p90_s']:.2f} / "
                        f"{row['late_max_s']:.2f}",
                        f"{row['polls_median']:g} / {row['polls_max']}",
                        row["over_6_polls"],
                        row["peak_polls_per_s"],
                    ]
                )
    text = table(
        [
            "inference s",
            "waits",
            "variant",
            "seen late s: median / p90 / max",
            "polls: median / max",
            "waits over 6 polls",
            "peak polls in a second",
        ],
        rows,
    )
    text += (
        f"\n\nVirtual time: the real Operations.wait and WaitSteer on a simulated clock; "
        f"submits spread over {args.submit_spread:g} s, each poll answered {args.answer_s:g} s "
        "later, the default PollPolicy (first poll 10 s, then 5 s growing 1.5x to 30 s, "
        "+-10% jitter)."
    )
    emit("firstwave", "A first wave with nothing known (virtual time)", text, {"rows": data})


if __name__ == "__main__":
    run_script(main)

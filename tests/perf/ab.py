"""A/B of two source trees: HIT and pass-through, each against same-run baselines.

    python -m tests.perf.ab BEFORE_TREE [AFTER_TREE] [--rounds 3]

For example ``git worktree add /tmp/before HEAD~3`` then ``python -m tests.perf.ab
/tmp/before``: both proxies (the console script, each importing its own tree) run
side by side against one nginx, alternating with the bare Starlette and aiohttp
reference baselines, so a change's cost is measured on the same noisy machine at once.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from pathlib import Path
from typing import Any

import httpx

from tests.perf.__main__ import DISTINCT_IDS, HERE, nginx, process, proxy_cmd, uvicorn_cmd, wrk
from tests.servers import free_port

parser = argparse.ArgumentParser(prog="python -m tests.perf.ab")
parser.add_argument("before")
parser.add_argument("after", nargs="?", default=str(HERE.parent.parent))
parser.add_argument("--rounds", type=int, default=3)
args = parser.parse_args()
work = Path(tempfile.mkdtemp(prefix="bvp-ab-"))
(work / "d.lua").write_text(DISTINCT_IDS)
trees = {"before": args.before, "after": args.after}
auth = {"Authorization": "Bearer sk-bf-bench"}
rounds, secs = args.rounds, 4.0
with nginx(work) as up, contextlib.ExitStack() as stack:
    ports, procs = {}, {}
    for name, tree in trees.items():
        p = free_port()
        ports[name] = p
        procs[name] = stack.enter_context(
            process(
                proxy_cmd(up, p),
                f"http://127.0.0.1:{p}/healthz",
                env={"PYTHONPATH": tree, "PROXY_POLL_COALESCE_SECONDS": "0"},
                log=work / f"{name}.log",
            )
        )
        hit_url = f"http://127.0.0.1:{p}/v1/videos/done_hit:openai"
        httpx.get(hit_url, headers=auth)
        assert httpx.get(hit_url, headers=auth).headers["x-cache-status"] == "HIT"
        (work / "hit.json").write_bytes(httpx.get(hit_url, headers=auth).content)
    env = {
        "BENCH_HIT_BODY": str(work / "hit.json"),
        "BENCH_UPSTREAM": up,
        "PYTHONPATH": args.after,
    }
    bp, rp, wp = free_port(), free_port(), free_port()
    stack.enter_context(
        process(
            uvicorn_cmd("tests.perf.baselines:bare", bp, env),
            f"http://127.0.0.1:{bp}/v1/videos/x",
            env=env,
        )
    )
    stack.enter_context(
        process(
            uvicorn_cmd("tests.perf.baselines:raw", wp, env),
            f"http://127.0.0.1:{wp}/v1/videos/x",
            env=env,
        )
    )
    stack.enter_context(
        process(
            uvicorn_cmd("tests.perf.baselines:reference", rp, env),
            f"http://127.0.0.1:{rp}/v1/videos/x",
            env=env,
        )
    )
    res: dict[str, list[float]] = {
        k: []
        for k in ("bare", "raw", "ref", "hit_before", "hit_after", "pt_before", "pt_after",
                  "hit_p99_before", "hit_p99_after", "pt_p99_before", "pt_p99_after", "ref_p99")
    }  # fmt: skip
    for name in trees:
        res[f"hit_cpu_us_{name}"], res[f"pt_cpu_us_{name}"] = [], []

    def cpu_us(name: str, run: Any) -> tuple[dict[str, float], float]:
        """wrk's figures, and the proxy's CPU (user + sys) per request in µs."""
        before = sum(procs[name].cpu_times()[:2])
        out = run()
        used = sum(procs[name].cpu_times()[:2]) - before
        return out, used / max(out["rps"] * secs, 1) * 1e6

    for _ in range(rounds):
        res["bare"].append(wrk(f"http://127.0.0.1:{bp}/v1/videos/done_hit:openai", secs)["rps"])
        res["raw"].append(wrk(f"http://127.0.0.1:{wp}/v1/videos/done_hit:openai", secs)["rps"])
        for name in trees:
            hit_url = f"http://127.0.0.1:{ports[name]}/v1/videos/done_hit:openai"
            out, cpu = cpu_us(name, lambda u=hit_url: wrk(u, secs, headers=auth))
            res[f"hit_{name}"].append(out["rps"])
            res[f"hit_p99_{name}"].append(out["p99_ms"])
            res[f"hit_cpu_us_{name}"].append(cpu)
        ref = wrk(f"http://127.0.0.1:{rp}/", secs, script=work / "d.lua")
        res["ref"].append(ref["rps"])
        res["ref_p99"].append(ref["p99_ms"])
        for name in trees:
            base = f"http://127.0.0.1:{ports[name]}/"
            out, cpu = cpu_us(
                name, lambda u=base: wrk(u, secs, script=work / "d.lua", headers=auth)
            )
            res[f"pt_{name}"].append(out["rps"])
            res[f"pt_p99_{name}"].append(out["p99_ms"])
            res[f"pt_cpu_us_{name}"].append(cpu)
    for k, v in res.items():
        print(
            k, [round(x, 2) if "p99" in k else round(x, 1) if "cpu" in k else round(x) for x in v]
        )
    for name in trees:
        print(
            name,
            "HIT/bare",
            round(
                statistics.median(
                    h / b for h, b in zip(res[f"hit_{name}"], res["bare"], strict=True)
                ),
                2,
            ),
            "HIT/raw ASGI",
            round(
                statistics.median(
                    h / b for h, b in zip(res[f"hit_{name}"], res["raw"], strict=True)
                ),
                2,
            ),
            "pass/ref",
            round(
                statistics.median(
                    h / b for h, b in zip(res[f"pt_{name}"], res["ref"], strict=True)
                ),
                2,
            ),
            "HIT p99 ms",
            round(statistics.median(res[f"hit_p99_{name}"]), 2),
            "pass p99 ms",
            round(statistics.median(res[f"pt_p99_{name}"]), 2),
            "CPU µs/hit",
            round(statistics.median(res[f"hit_cpu_us_{name}"]), 1),
            "CPU µs/miss",
            round(statistics.median(res[f"pt_cpu_us_{name}"]), 1),
        )

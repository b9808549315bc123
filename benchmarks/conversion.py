"""How to hand a message body to a Lua handler: measured per call, 1 and 2 threads.

Strategies for a small JSON payload ({"id", "numbers": [1..10], "text"}):
  py-convert   json.loads in Python, then the runtime's to_lua (dict -> fresh tables)
  py-tablefrom json.loads in Python, then lupa's table_from(recursive=True)
  lua-decode   the JSON bytes go in as one Lua string; lua_modules/json.lua decodes them

Run: python -m benchmarks.conversion [--n 50000]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

from runtime.lua.convert import to_lua
from runtime.lua.engine import new_lua_runtime
from runtime.lua.paths import lua_module_source

PAYLOAD = {"id": 1, "numbers": list(range(1, 11)), "text": "hello"}
HANDLER = "function(body) return body.id end"


def make_state() -> tuple[Any, Any, Any]:
    lua = new_lua_runtime()
    g = lua.globals()
    errors = g.loadstring(lua_module_source("errors"), "@errors.lua")()
    js = g.loadstring(lua_module_source("json"), "@json.lua")(errors)
    handler = lua.eval(HANDLER)
    decode_call = lua.eval("function(decode, h) return function(s) return h(decode(s)) end end")(
        js.decode, handler)
    return lua, handler, decode_call


def run(strategy: str, n: int) -> None:
    lua, handler, decode_call = make_state()
    text = json.dumps(PAYLOAD).encode()
    if strategy == "py-convert":
        for _ in range(n):
            handler(to_lua(lua, json.loads(text)))
    elif strategy == "py-tablefrom":
        for _ in range(n):
            handler(lua.table_from(json.loads(text), recursive=True))
    else:
        for _ in range(n):
            decode_call(text)


def measure(strategy: str, n: int, threads: int) -> float:
    """Calls per second with `threads` threads, each with its own Lua state."""
    workers = [threading.Thread(target=run, args=(strategy, n)) for _ in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return n * threads / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50_000)
    args = parser.parse_args()
    print(f"{'strategy':14} {'µs/call (1 thread)':>20} {'calls/s 1 thr':>14} {'calls/s 2 thr':>14} {'2/1':>6}")
    results = {}
    for strategy in ("py-convert", "py-tablefrom", "lua-decode"):
        one = measure(strategy, args.n, 1)
        two = measure(strategy, args.n, 2)
        results[strategy] = {"us_per_call": 1e6 / one, "rate_1": one, "rate_2": two}
        print(f"{strategy:14} {1e6 / one:20.2f} {one:14,.0f} {two:14,.0f} {two / one:6.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

"""What the per-request model check costs: ``serves_model`` and ``candidates``.

    python -m benchmarks.model_check [--workers 8 64] [--models 4]

Every request that names a model asks the registry whether any worker serves it (the
unknown-model 404) and then lists the available workers that do. The first must be one
dictionary lookup whatever the fleet size; the second is one pass over the workers with a
set lookup each. Prints nanoseconds per call, best of several timing runs.
"""

from __future__ import annotations

import argparse
import timeit

from cache_router.core.registry import WorkerRegistry


def _fleet(workers: int, models: int) -> WorkerRegistry:
    registry = WorkerRegistry()
    for index in range(workers):
        worker = registry.add(f"http://10.0.{index // 250}.{index % 250}:8000")
        registry.set_models(worker, [f"model-{index % models}", f"model-{index % models}-lora"])
    return registry


def _ns(statement: str, namespace: dict[str, object], number: int = 200_000) -> float:
    best = min(timeit.repeat(statement, globals=namespace, number=number, repeat=5))
    return best / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--models", type=int, default=4)
    args = parser.parse_args()
    print(f"{'workers':>8} {'serves_model hit':>17} {'serves_model miss':>18} {'candidates':>11}")
    for workers in args.workers:
        namespace: dict[str, object] = {"registry": _fleet(workers, args.models)}
        hit = _ns("registry.serves_model('model-1')", namespace)
        miss = _ns("registry.serves_model('no-such-model')", namespace)
        listed = _ns("registry.candidates('model-1')", namespace, number=50_000)
        print(f"{workers:>8} {hit:>14.0f} ns {miss:>15.0f} ns {listed:>8.0f} ns")


if __name__ == "__main__":
    main()

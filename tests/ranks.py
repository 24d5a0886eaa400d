"""Run a test function in several CPU processes joined by a gloo process group; collect what each returns.

``fn(rank, world)`` must be a module-level function (it is pickled into spawned processes) and return
something JSON-able; ``run_on_ranks`` returns those results in rank order.
"""
import json
import os
import socket
from pathlib import Path
from typing import Any, Callable, List

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out: str, fn: Callable[[int, int], Any]) -> None:
    import compress  # noqa: F401  (torchvision guard before timm, in the child too)

    import torch
    import torch.distributed as dist

    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = fn(rank, world)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()  # no rank tears gloo down while another is still in a collective (that aborts it)
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[[int, int], Any], tmp_path: Path, world: int = 2) -> List[Any]:
    mp.spawn(_entry, args=(world, _free_port(), str(tmp_path), fn), nprocs=world, join=True)
    return [json.loads((Path(tmp_path) / f"rank{r}.json").read_text()) for r in range(world)]

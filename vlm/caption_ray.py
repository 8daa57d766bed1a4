"""Captioning on a Ray cluster: `vlm caption SRC -o OUT --ray ADDRESS|local --workers N`.

The driver lists the inputs, skips those already done, and hands the rest to Ray Data:
`from_items(paths).map_batches(Captioner)` on a pool of N actors, where each `Captioner` actor loads the
model once and captions its batches exactly as a local run does (`caption_records`). Records
stream back to the driver (`iter_rows`), which appends each, whole and flushed, to the same
JSONL/CSV as a local run, so the run stays resumable. Paths must be readable by every worker
(a shared filesystem) when the cluster spans machines. Ray is optional: `pip install "vlm[ray]"`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vlm.caption import DEFAULT_PROMPT, STAGES, CaptionSummary, caption_records, run_captioning
from vlm.errors import VlmError
from vlm.loader import load


class Captioner:
    """A Ray actor: one model loaded once per worker, captioning batches of paths."""

    def __init__(self, model: str, load_options: dict, prompt: str, batch: int, max_new_tokens: int,
                 generate_options: dict):
        self.model = load(model, **load_options)
        if self.model.family is None:
            raise VlmError("captioning needs a vision-language model; this one has no vision encoder")
        self.settings = (prompt, batch, max_new_tokens)
        self.generate_options = generate_options

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, list]:
        ids = [str(p) for p in rows["path"]]
        stages = dict.fromkeys(STAGES, 0.0)
        records = list(caption_records(self.model, ids, *self.settings, stages, **self.generate_options))
        share = json.dumps({k: v / len(records) for k, v in stages.items()})  # summed back on the driver
        return {"record": [json.dumps(r, ensure_ascii=False) for r in records], "stages": [share] * len(records)}


def caption_on_ray(model: str, source: str, output: str | os.PathLike, address: str, workers: int = 1,
                   threads: int = 1, load_options: dict | None = None, prompt: str = DEFAULT_PROMPT, batch: int = 4,
                   max_new_tokens: int = 64, progress: bool = True, shard: tuple[int, int] | None = None,
                   **generate_options) -> CaptionSummary:
    """Caption `source` into `output` on a Ray cluster: `address` joins a running one ("auto" or
    host:port), "local" starts one on this machine. `workers` actors with `threads` CPUs each.
    A Ray already initialized in this process (a test's, say) is used as it is."""
    try:
        import ray
    except ImportError:
        raise VlmError('--ray needs Ray, an optional extra: pip install "vlm[ray]"') from None
    if workers < 1 or threads < 1 or batch < 1:
        raise VlmError("workers, threads and batch must be >= 1")
    load_options = dict(load_options or {}, threads=threads)

    def records(todo: list[str], stages: dict[str, float]) -> Iterator[dict]:
        if not todo:
            return
        if not ray.is_initialized():
            # Workers import this tree's vlm (a checkout, not only an installed one); on another
            # machine where the path does not exist they import their own installed vlm.
            env = {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}}
            ray.init(address=None if address == "local" else address, runtime_env=env,
                     include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False  # the driver's own bar counts images
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # its INFO lines; failures end as one VlmError
        options = (model, load_options, prompt, batch, max_new_tokens, generate_options)
        dataset = ray.data.from_items([{"path": p} for p in todo]).map_batches(
            Captioner, fn_constructor_args=options, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads,
            batch_size=batch)
        try:
            for row in dataset.iter_rows():
                for name, seconds in json.loads(row["stages"]).items():
                    stages[name] += seconds
                yield json.loads(row["record"])
        except ray.exceptions.RayError as e:
            lines = [line for line in str(e).splitlines() if line.strip()]
            raise VlmError(f"the Ray run failed: {lines[-1] if lines else type(e).__name__}") from None

    return run_captioning(source, output, records, shard, progress)

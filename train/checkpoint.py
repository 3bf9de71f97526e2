"""Training checkpoints: orbax ``CheckpointManager`` (atomic writes, the newest few kept) plus the run's
configuration, checked on ``--resume`` so a run never continues with different settings."""

from __future__ import annotations

import json
import os

import jax

from kvjax.jsonio import write_json_atomic


class CheckpointStore:
    def __init__(self, directory: str, record: dict, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.record = record
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep))
        self.record_path = os.path.join(self.directory, "run.json")

    def latest_step(self):
        return self.manager.latest_step()

    def check_fresh(self, resume: bool):
        """A new run refuses a directory that already holds checkpoints (nothing is overwritten silently)."""
        if self.latest_step() is not None and not resume:
            raise FileExistsError(f"{self.directory} already holds checkpoints (newest step {self.latest_step()}); "
                                  f"pass --resume to continue that run or choose another --out")
        write_json_atomic(self.record_path, self.record)

    def save(self, step: int, variables, opt_state):
        args = self._ocp.args.StandardSave({"variables": variables, "opt_state": opt_state})
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, variables_template, opt_template):
        try:
            with open(self.record_path) as f:
                saved = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.record_path}: cannot read the run record to resume ({e})") from None
        mine = self.record["train_config"]
        diff = {k: (saved["train_config"].get(k), v) for k, v in mine.items()
                if k not in ("steps2", "eval_every", "save_every") and saved["train_config"].get(k) != v}
        if diff:
            raise ValueError(f"{self.directory}: --resume with different settings {diff} (saved, now)")
        if saved.get("model", {}).get("sha256") != self.record["model"].get("sha256"):
            raise ValueError(f"{self.directory}: checkpoints were trained for another model")
        target = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), {"variables": variables_template, "opt_state": opt_template})
        try:
            out = self.manager.restore(step, args=self._ocp.args.StandardRestore(target))
        except Exception as e:
            raise ValueError(f"{self.directory}/{step}: checkpoint is damaged or does not match this run "
                             f"({type(e).__name__}: {str(e)[:300]})") from None
        return out["variables"], out["opt_state"]

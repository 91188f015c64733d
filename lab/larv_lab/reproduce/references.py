"""Reference "methods" of the experiments that FusionBench does not have (registry:
``larv_lab/config/larv/mergers.yaml``, ``references``)."""

from __future__ import annotations

from collections.abc import Iterator

from fusion_bench import BaseAlgorithm, BaseModelPool
from torch import nn

from fusion_bench_larv.evaluation.clip_taskpool import EVAL_TASKS


class _ModelsByName(dict):
    """``{name: model}`` that loads each model when it is reached, so FusionBench's program
    (``evaluate_merged_model`` walks ``items()``) holds one fine-tuned model at a time."""

    def __init__(self, modelpool: BaseModelPool):
        super().__init__(dict.fromkeys(modelpool.model_names))
        self._pool = modelpool

    def __getitem__(self, name: str) -> nn.Module:
        if name not in self.keys():
            raise KeyError(name)
        model = self._pool.load_model(name)
        setattr(model, EVAL_TASKS, [name])  # read on its own task only
        return model

    def items(self) -> Iterator[tuple[str, nn.Module]]:  # type: ignore[override]
        for name in self.keys():
            yield name, self[name]

    def values(self) -> Iterator[nn.Module]:  # type: ignore[override]
        for _, model in self.items():
            yield model


class FineTunedModels(BaseAlgorithm):
    """The fine-tuned models themselves, by task, each tagged to be evaluated on its own task only
    (:data:`fusion_bench_larv.evaluation.clip_taskpool.EVAL_TASKS`; the testbed's and the recording CLIP task
    pools honour it): ``program_report.json`` is ``{task: <that model's report on that task>}``,
    the fine-tuned upper bound."""

    def run(self, modelpool: BaseModelPool) -> dict[str, nn.Module]:
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(modelpool)
        return _ModelsByName(modelpool)

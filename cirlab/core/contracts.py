"""The model contract, written once: what the engine, the workbench and the registry may call on a model.

Every registered model is an ``nn.Module`` satisfying :class:`Model` plus the protocol of its task
(:class:`CIRModel`, :class:`ITMModel` or :class:`Reranker`). The optional hooks are small protocols of their
own; the engine asks ``isinstance(model, HasVocab)`` rather than probing attribute names, and
:func:`check_model` (run by :func:`cirlab.create_model`) refuses a model that misses a required method of its
task. Router models additionally emit through :func:`cirlab.core.tracing.emit`; nothing else is needed for
:func:`cirlab.trace_routes`.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    import torch

TASKS = ("cir", "itm", "rerank")
# the columns of a route-trace frame (cirlab.core.tracing.RouteTrace.to_frame), which the workbench's analysis reads
FRAME_COLUMNS = ("query_id", "layer", "source", "destination", "expert", "code_index", "paper_name", "weight")


@runtime_checkable
class Model(Protocol):
    """Every model: its identity, its config dataclass, one training step and its paper's optimisation."""

    model_name: ClassVar[str]  # the registry name, saved in checkpoints
    task: ClassVar[str]  # one of TASKS
    config: Any  # a PresetMixin dataclass
    # optional ``min_micro_batch: ClassVar[int]``: the fewest items a micro-batch needs for a learning signal (2 for
    # a loss over in-batch negatives); the trainer refuses a batch_size that gives fewer per process

    def training_step(self, batch: dict[str, Any]) -> dict[str, "torch.Tensor"]:
        """Named terms; the trainer sums the keys ending in ``_loss`` and logs all of them."""

    def default_train_config(self) -> dict[str, Any]:
        """The paper's optimisation (cirlab.engine.train.TrainConfig fields), merged under the user's."""


@runtime_checkable
class CIRModel(Protocol):
    """Composed image retrieval: L2-normalised query and target embeddings, scored by dot product."""

    def encode_query(self, ref_images: "torch.Tensor", texts: Sequence[str]) -> "torch.Tensor": ...

    def encode_target(self, images: "torch.Tensor") -> "torch.Tensor": ...


@runtime_checkable
class ITMModel(Protocol):
    """Image-text matching on precomp region features; ``score`` may need every pair (cross-attention) or be
    a matrix product (dual encoders)."""

    def encode_image(self, image_feats: "torch.Tensor") -> Any: ...

    def encode_text(self, texts: Sequence[str]) -> Any: ...

    def score(self, image: Any, text: Any) -> "torch.Tensor": ...


@runtime_checkable
class Reranker(Protocol):
    """A second stage scoring a first stage's top-K candidates (``[B, K]`` scores for ``[B, K]`` gallery ids);
    evaluated by its own pipeline (:class:`HasOwnEvaluation`)."""

    def score_candidates(self, queries: dict[str, Any], candidate_ids: "torch.Tensor") -> "torch.Tensor": ...

    def candidate_scorer(self, split: Any, *, batch_size: int = 32, cache: Any = None) -> Callable[..., Any]:
        """``score(rows [b], candidates [b, K]) -> [b, K]`` over one split (the re-ranking engine's entry)."""


@runtime_checkable
class TracedModel(Protocol):
    """A router model: it declares what its routers emit through :func:`cirlab.core.tracing.emit` while a
    :func:`cirlab.trace_routes` block is active (``"gate"``: AMC's expert weights, ``"path"``: DIME's cell-to-cell
    paths), so tools know the frame to expect."""

    trace_kind: ClassVar[str]


# ------------------------------------------------------------------------------------------- optional hooks
@runtime_checkable
class HasOwnEvaluation(Protocol):
    """Models with their own evaluation pipeline (re-rankers over a top-K file)."""

    def evaluate_split(self, loaded: Any, *, eval_config: dict[str, Any], device: Any,
                       topk_dir: Any = None) -> dict[str, Any]: ...


@runtime_checkable
class HasParamGroups(Protocol):
    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups with their own ``lr`` (e.g. a lower one for a pretrained backbone)."""


@runtime_checkable
class HasVocab(Protocol):
    def fit_vocab(self, source: Any) -> int:
        """Data-dependent set-up from the training captions before training; returns the vocabulary size."""


@runtime_checkable
class HasDatasetExtras(Protocol):
    def dataset_extras(self) -> dict[str, Any]:
        """Keyword arguments for ``PrecompSplit.pair_dataset`` (DIME's random extra caption / image)."""


@runtime_checkable
class HasImageTransform(Protocol):
    def image_transform(self, train: bool) -> Callable[[Any], "torch.Tensor"]: ...


@runtime_checkable
class HasGalleryScorer(Protocol):
    def gallery_scorer(self) -> Callable[..., "torch.Tensor"] | None:
        """``score(ref_images, texts, gallery [G, D]) -> [B, G]`` when the model's score is not a dot product of a
        query embedding with ``encode_target`` features (CaLa's ARTEMIS frame), else None. The engine's CIR
        evaluation then scores each query batch against the encoded gallery with it."""


@runtime_checkable
class HasInit(Protocol):
    def load_init(self, report_dir: Any = None) -> list[Any]:
        """Apply the model config's pretrained start (``init_from``); write its loading report to ``report_dir``
        (as :data:`INIT_REPORT`)."""


INIT_REPORT = "init_from.json"  # the loading report HasInit.load_init writes into the run folder
# the attribute cirlab.workbench.load_run sets on a model: the run folder it comes from, whose dataset settings
# workbench.evaluate_run evaluates it with; training the model again (cirlab.fit) drops it
RUN_DIR_ATTRIBUTE = "cirlab_run_dir"


@runtime_checkable
class HasOriginalCheckpoint(Protocol):
    def load_original(self, checkpoint: Any, source: str) -> dict[str, list[str]]:
        """Load a file saved by the paper's own code in a layout the generic reader cannot see (DIME's and HREM's
        ``{"model": [img_enc, txt_enc, ...]}`` lists); returns what was ignored or kept as built. Raises
        :class:`cirlab.core.errors.CheckpointError` naming ``source`` when it does not fit."""


@runtime_checkable
class HasEpochHook(Protocol):
    def on_epoch_start(self, epoch: int) -> None: ...


@runtime_checkable
class HasEnsemble(Protocol):
    @classmethod
    def ensemble(cls, models: Sequence[Any]) -> Any:
        """One model scoring as the mean of the members' scores."""


@runtime_checkable
class HasEvalPrecision(Protocol):
    def eval_precision(self, device: Any) -> str:
        """The number format its evaluation scores in on ``device`` (``"bfloat16"``, ``"float32"``), when the model
        chooses one itself (DIME's ``eval_dtype="auto"``: bf16 on CPUs with bf16 units); ``provenance.json`` and
        ``cirlab eval``'s output record it beside the training precision."""


TASK_PROTOCOLS: dict[str, type] = {"cir": CIRModel, "itm": ITMModel, "rerank": Reranker}


def check_model(model: Any) -> None:
    """Raise :class:`~cirlab.core.errors.ModelContractError` (a ``TypeError``) naming what is missing when ``model``
    is not a ``torch.nn.Module`` or does not satisfy :class:`Model` and its task's protocol."""
    import torch

    from cirlab.core.errors import ModelContractError

    name = type(model).__name__
    if not isinstance(model, torch.nn.Module):  # the trainer, evaluation and checkpoints all need one
        raise ModelContractError(f"{name} is not a torch.nn.Module: a cirlab model class subclasses nn.Module")
    task = getattr(model, "task", None)  # the class's, or the registration's (set on the instance)
    if task not in TASK_PROTOCOLS:
        raise ModelContractError(f"{name}.task is {task!r}; expected one of {', '.join(TASKS)}")
    for protocol in (Model, TASK_PROTOCOLS[task]):
        if not isinstance(model, protocol) or _uncallable(model, protocol):
            missing = [m for m in _members(protocol) if not hasattr(model, m)]
            what = f"missing {missing}" if missing else f"not callable: {_uncallable(model, protocol)}"
            raise ModelContractError(f"{name} does not satisfy the {protocol.__name__} contract: {what}")


def _uncallable(model: Any, protocol: type) -> list[str]:
    """The protocol's methods that ``model`` has as something else (a dict named ``default_train_config``)."""
    return [m for m in _members(protocol) if callable(getattr(protocol, m, None)) and hasattr(model, m)
            and not callable(getattr(model, m))]


# what each task's protocol is called in a message, and the model kinds that satisfy it
_KINDS = {"Model": "a cirlab model (cirlab.create_model, workbench.load_run)",
          "CIRModel": "a composed-retrieval model (amc, cala, blip_rerank_stage1)",
          "ITMModel": "an image-text matching model (dime, hrem)", "Reranker": "a re-ranker (blip_rerank_stage2)",
          "TracedModel": "a router model (amc, dime, or one of your own emitting through cirlab.core.tracing.emit)"}


def model_label(model: Any) -> str:
    """A model's name wherever cirlab writes or says one (errors, checkpoints' ``model_name``, top-K metadata):
    its registry name (``amc``), else its class."""
    return getattr(model, "model_name", None) or type(model).__name__


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """``model`` in eval mode inside the block, and every one of its modules' training flags as they were after it
    (an error inside too): a workbench call between epochs of the user's own training loop left the model in eval
    mode (dropout off) for the rest of it. Each module's own flag, not ``model.train(was)``, which would also switch
    on a part the user had put in eval mode."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def require_model(model: Any, protocol: type, where: str, *, hint: str = "") -> None:
    """Stop ``where`` with one line when ``model`` lacks ``protocol`` (an ITM model given to a CIR evaluation failed
    as torch's ``'DIME' object has no attribute 'encode_target'``). ``hint`` says what to call instead."""
    from cirlab.core.errors import ModelMismatchError

    if isinstance(model, protocol):
        return
    got = model_label(model)
    task = getattr(model, "task", None)
    need = _KINDS.get(protocol.__name__, f"a model with {', '.join(_members(protocol))}")
    raise ModelMismatchError(f"{where} needs {need}; got {got!r}" + (f" (task {task})" if task else "")
                             + (f": {hint}" if hint else ""))


def _members(protocol: type) -> list[str]:
    annotations = list(getattr(protocol, "__annotations__", {}))
    methods = [k for k, v in vars(protocol).items() if callable(v) and not k.startswith("_")]
    return annotations + methods

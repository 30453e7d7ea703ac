"""DistributedDataParallel: 2 CPU processes (gloo) train to the same weights as 1 process on the same global batch."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cirlab
from cirlab.engine.train import TrainConfig, train

# eps: Adam divides by sqrt(v) + eps; with the default 1e-8 a near-zero gradient turns float re-association noise
# (the gradient all-reduce sums in another order) into visible weight differences. 1e-4 keeps the comparison sharp.
CFG = dict(epochs=2, batch_size=8, lr=2e-2, eps=1e-4, grad_clip=1.0, schedule="step", lr_milestones=[1], log_every=1,
           tensorboard=False, progress="none", selection="last", seed=3, checkpoint_every=3)


def _model():
    torch.manual_seed(0)
    return cirlab.create_model("stub_cir", preset="tiny", loss="cosine")  # per-sample loss, no dropout


def _evaluate(model):
    # gathered evaluation: each process scores its shard, all_gather gives every process the full result
    from stub_models import TripletItems

    items = TripletItems(20, seed=1, noise=0.0)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    idx = list(range(rank, len(items), world))
    local = torch.stack([(model.encode_query(items[i]["ref_image"][None], [items[i]["text"]])
                          * model.encode_target(items[i]["target_image"][None])).sum() for i in idx])
    if world > 1:
        parts = [torch.zeros_like(local) for _ in range(world)]
        dist.all_gather(parts, local)
        local = torch.cat(parts)
    return {"val": {"sim": float(local.mean()), "n": float(len(local))}}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import stub_models  # noqa: F401 - registers the stubs in the spawned process

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = train(_model(), stub_models.TripletItems(36), TrainConfig(**CFG), output_dir=out_dir,
                       evaluate_fn=_evaluate)
        assert result["eval_history"][-1]["metrics"]["val"]["n"] == 20.0
        torch.save(result["losses"], os.path.join(out_dir, f"losses_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_equals_single_process(tmp_path):
    from stub_models import TripletItems

    single_model = _model()
    single = train(single_model, TripletItems(36), TrainConfig(**CFG), output_dir=tmp_path / "single",
                   evaluate_fn=_evaluate)

    ddp_dir = tmp_path / "ddp"
    mp.spawn(_worker, args=(2, str(tmp_path / "rdzv"), str(ddp_dir)), nprocs=2, join=True)

    ddp_state = torch.load(ddp_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    single_state = single_model.state_dict()
    assert single["steps"] == 8  # 36 items // 8 = 4 steps per epoch, 2 epochs
    for key, value in single_state.items():
        torch.testing.assert_close(ddp_state[key], value, rtol=0, atol=1e-6)
    moved = max(float((v - _model().state_dict()[k]).abs().max()) for k, v in single_state.items())
    assert moved > 5e-3  # the comparison is not between two untrained models
    # rank 0 alone wrote the run folder; the per-rank losses average to the global one
    assert sorted(p.name for p in (ddp_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    r0, r1 = (torch.load(ddp_dir / f"losses_rank{r}.pt") for r in (0, 1))
    for s, a, b in zip(single["losses"], r0, r1):
        assert abs(s - (a + b) / 2) < 1e-5
    # the checkpoint holds every rank's RNG streams for an exact DDP resume
    last = torch.load(ddp_dir / "checkpoints" / "last.pt", weights_only=True)
    assert len(last["rng"]["per_rank"]) == 2


class _RandomPrecomp(torch.utils.data.Dataset):
    """HREM training items: 12 random regions of the tiny preset's width and a caption from a small vocabulary."""

    def __init__(self, n: int, dim: int) -> None:
        self.n, self.dim = n, dim

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"image_feats": torch.rand(12, self.dim, generator=g), "text": f"a man with a dog and a ball {i % 5}",
                "image_idx": i}


def _hrem():
    torch.manual_seed(0)
    return cirlab.create_model("hrem", preset="tiny", warmup_iters=2)  # relation module idle for 2 steps


def _hrem_worker(rank: int, world: int, init_file: str, out_dir: str, find_unused: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _hrem()
        cfg = {**model.default_train_config(), "epochs": 1, "max_steps": 4, "batch_size": 8, "tensorboard": False,
               "progress": "none", "selection": "last", "eval_every": 0, "ddp_find_unused_parameters": find_unused}
        train(model, _RandomPrecomp(32, model.config.img_dim), TrainConfig(**cfg), output_dir=out_dir)
    finally:
        dist.destroy_process_group()


def test_hrem_trains_under_ddp_across_its_relation_warm_up(tmp_path):
    """HREM's relation module gets no gradient before warmup_iters; its default train config tells DDP so."""
    assert _hrem().default_train_config()["ddp_find_unused_parameters"] is True
    mp.spawn(_hrem_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path / "ok"), True), nprocs=2, join=True)
    state = torch.load(tmp_path / "ok" / "checkpoints" / "last.pt", weights_only=True)
    assert state["progress"]["step"] == 4
    # without the flag DDP stops at the second step (the reduction of step 1 never finished)
    import pytest

    with pytest.raises(Exception, match="(?i)reduction|unused|did not receive grad"):
        mp.spawn(_hrem_worker, args=(2, str(tmp_path / "rdzv2"), str(tmp_path / "bad"), False), nprocs=2, join=True)

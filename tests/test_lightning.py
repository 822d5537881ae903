"""The Lightning callback, against the real ``lightning`` package (CPU)."""

import numpy as np
import pytest
import torch

L = pytest.importorskip("lightning")

import unlearn  # noqa: E402
from updatestore import STATUS_RECORDED, STATUS_SKIPPED, RecorderError, UpdateStore  # noqa: E402
from updatestore.integrations.lightning import UpdateStoreCallback  # noqa: E402

N, BATCH, ACCUMULATE, EPOCHS = 20, 4, 2, 3


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(N, 12, generator=g), torch.randint(0, 3, (N,), generator=g)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "sample_id": 1000 + i}


class Module(L.LightningModule):
    def __init__(self, inf_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(12, 16), torch.nn.Linear(16, 3)
        self.inf_at = inf_at

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self(batch["x"]), batch["y"])
        if self.inf_at is not None and (self.current_epoch, batch_idx) == self.inf_at:
            loss = loss * float("inf")  # a GradScaler sees inf gradients and skips the step
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Crash(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == (1, 3):
            raise RuntimeError("simulated crash")


def loader():
    return torch.utils.data.DataLoader(Data(), batch_size=BATCH, shuffle=False)


def trainer(tmp_path, callbacks, **kw):
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, accumulate_grad_batches=ACCUMULATE,
                     logger=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=callbacks + [ckpt], default_root_dir=tmp_path, **kw)


def steps_and_samples(store):
    return [store.samples_in(s).tolist() for s in range(store.num_batches)]


def test_accumulation_records_every_micro_batch_under_its_step(tmp_path):
    model = Module()
    with UpdateStore.create(tmp_path / "s", model, keep=1.0, value_dtype="float32") as store:
        trainer(tmp_path, [UpdateStoreCallback(store)]).fit(model, loader())
        per_step = steps_and_samples(store)
        # 5 batches an epoch, accumulation 2: steps after batches 1, 3 and the epoch's last (4)
        assert len(per_step) == 3 * EPOCHS
        assert per_step[:3] == [list(range(1000, 1008)), list(range(1008, 1016)), list(range(1016, 1020))]
        assert (store.step_status() == STATUS_RECORDED).all()
        assert store.history()[-1]["event"] == "close"


def test_interrupted_run_resumed_from_checkpoint_equals_uninterrupted(tmp_path):
    whole = Module()
    with UpdateStore.create(tmp_path / "a", whole, keep=1.0, value_dtype="float32") as a:
        trainer(tmp_path / "ta", [UpdateStoreCallback(a)]).fit(whole, loader())

    first = Module()
    with UpdateStore.create(tmp_path / "b", first, keep=1.0, value_dtype="float32") as b:
        with pytest.raises(RuntimeError, match="simulated crash"):
            trainer(tmp_path / "tb", [UpdateStoreCallback(b), Crash()]).fit(first, loader())
        assert b.num_batches == 3 + 1  # epoch 0, then one step of epoch 1 before the crash
    resumed = Module()
    ckpt = sorted((tmp_path / "tb" / "ckpt").glob("epoch=0-*.ckpt"))[0]
    with UpdateStore.open(tmp_path / "b", "r+") as b:
        trainer(tmp_path / "tb", [UpdateStoreCallback(b)]).fit(resumed, loader(), ckpt_path=ckpt)
        assert any(e["event"] == "rollback" and e["from_step"] == 4 and e["step"] == 3 for e in b.history())

    for name, p in whole.state_dict().items():
        assert torch.equal(p, resumed.state_dict()[name]), name
    with UpdateStore.open(tmp_path / "a", "r+") as a, UpdateStore.open(tmp_path / "b", "r+") as b:
        assert steps_and_samples(a) == steps_and_samples(b)
        forget = [1001, 1013]
        ra = unlearn.amnesiac(whole, a, forget, device="cpu")
        rb = unlearn.amnesiac(resumed, b, forget, device="cpu")
        assert ra.steps_hit.tolist() == rb.steps_hit.tolist() == [0, 1, 3, 4, 6, 7]
    for name, p in whole.state_dict().items():
        assert torch.equal(p, resumed.state_dict()[name]), name


def test_bf16_mixed_and_a_step_the_scaler_skipped(tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    model = Module()
    with UpdateStore.create(tmp_path / "s", model, keep=0.5) as store:
        trainer(tmp_path / "bf", [UpdateStoreCallback(store)], precision="bf16-mixed",
                gradient_clip_val=0.05).fit(model, loader())  # clipping happens before the step: still recorded
        assert store.num_batches == 3 * EPOCHS and (store.step_status() == STATUS_RECORDED).all()
    model = Module(inf_at=(0, 3))
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with UpdateStore.create(tmp_path / "t", model, keep=0.5) as store:
        trainer(tmp_path / "fp16", [UpdateStoreCallback(store)], plugins=[plugin]).fit(model, loader())
        status = store.step_status()
        assert len(status) == 3 * EPOCHS and status[1] == STATUS_SKIPPED
        assert store.samples_in(1).tolist() == list(range(1008, 1016))  # its samples are still indexed
        assert (np.delete(status, 1) == STATUS_RECORDED).all()


def test_batches_without_ids_and_bad_arguments_are_clear_errors(tmp_path):
    model = Module()
    with UpdateStore.create(tmp_path / "s", model) as store:
        with pytest.raises(RecorderError, match="sample_id"):
            no_ids = torch.utils.data.DataLoader([{"x": torch.zeros(12), "y": 0}] * 4, batch_size=2)
            trainer(tmp_path, [UpdateStoreCallback(store)]).fit(model, no_ids)
        assert store.num_batches == 0
    with pytest.raises(Exception, match="read-only"):
        UpdateStoreCallback(UpdateStore.open(tmp_path / "s"))

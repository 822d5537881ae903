"""The Hugging Face Trainer callback, against the real ``transformers`` package (tiny GPT-2, CPU)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import unlearn  # noqa: E402
from updatestore import STATUS_RECORDED, RecorderError, UpdateStore  # noqa: E402
from updatestore.integrations.transformers import UpdateStoreCallback  # noqa: E402

DOCS, LENGTH = 24, 12


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config)


def corpus(with_ids=True):
    """Small 'documents' of token IDs made here: a repeated phrase per document plus noise."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(DOCS):
        phrase = torch.randint(0, 40, (4,), generator=g)
        ids = phrase.repeat(LENGTH // 4)
        row = {"input_ids": ids, "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": ids.clone()}
        if with_ids:
            row["sample_id"] = 700 + i
        rows.append(row)
    return rows


def arguments(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                num_train_epochs=2, learning_rate=5e-3, save_strategy="steps", save_steps=2, report_to=[],
                use_cpu=True, logging_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def fit(store, model, out, *, resume=None, callbacks=(), **kw):
    trainer = transformers.Trainer(model=model, args=arguments(out, **kw), train_dataset=corpus(),
                                   callbacks=[UpdateStoreCallback(store), *callbacks])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def per_step(store):
    return [store.samples_in(s).tolist() for s in range(store.num_batches)]


def test_every_step_recorded_with_all_its_micro_batches(tmp_path):
    model = tiny_gpt2()
    with UpdateStore.create(tmp_path / "s", model, keep=0.1) as store:
        fit(store, model, tmp_path / "out")  # default remove_unused_columns=True
        steps = per_step(store)
        assert len(steps) == 6 and all(len(s) == 8 for s in steps)  # 24 docs / (4 × 2) per epoch, 2 epochs
        for epoch in (steps[:3], steps[3:]):
            assert sorted(sum(epoch, [])) == list(range(700, 700 + DOCS))  # each epoch sees every doc once
        assert (store.step_status() == STATUS_RECORDED).all()
    assert "forward" not in vars(model)  # the wrapper is gone after training


class Crash(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == 5:
            raise RuntimeError("simulated crash")


def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path):
    whole = tiny_gpt2()
    with UpdateStore.create(tmp_path / "a", whole, keep=1.0, value_dtype="float32") as a:
        fit(a, whole, tmp_path / "oa")

    first = tiny_gpt2()
    b = UpdateStore.create(tmp_path / "b", first, keep=1.0, value_dtype="float32")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(b, first, tmp_path / "ob", callbacks=[Crash()])
    b.close()  # what the process had committed when it died: steps 0..4 (checkpoint-4 is at step 4)
    assert UpdateStore.open(tmp_path / "b").num_batches == 5

    resumed = tiny_gpt2()
    with UpdateStore.open(tmp_path / "b", "r+") as b:
        fit(b, resumed, tmp_path / "ob", resume=str(tmp_path / "ob" / "checkpoint-4"))
        assert any(e["event"] == "rollback" and (e["from_step"], e["step"]) == (5, 4) for e in b.history())
    for name, p in whole.state_dict().items():
        torch.testing.assert_close(p, resumed.state_dict()[name], rtol=0, atol=1e-6, msg=name)
    with UpdateStore.open(tmp_path / "a", "r+") as a, UpdateStore.open(tmp_path / "b", "r+") as b:
        assert per_step(a) == per_step(b)
        forget = per_step(a)[1][:2]
        ra = unlearn.amnesiac(whole, a, forget, device="cpu")
        rb = unlearn.amnesiac(resumed, b, forget, device="cpu")
        assert ra.steps_hit.tolist() == rb.steps_hit.tolist()
    for name, p in whole.state_dict().items():
        torch.testing.assert_close(p, resumed.state_dict()[name], rtol=0, atol=1e-6, msg=name)


def test_bf16_and_missing_ids(tmp_path):
    model = tiny_gpt2()
    with UpdateStore.create(tmp_path / "s", model, keep=0.1) as store:
        fit(store, model, tmp_path / "o", bf16=True, num_train_epochs=1)
        assert store.num_batches == 3
    model = tiny_gpt2()
    with UpdateStore.create(tmp_path / "t", model, keep=0.1) as store:
        trainer = transformers.Trainer(model=model, args=arguments(tmp_path / "o2"), train_dataset=corpus(False),
                                       callbacks=[UpdateStoreCallback(store)])
        with pytest.raises(RecorderError, match="sample_id"):
            trainer.train()
        assert store.num_batches == 0

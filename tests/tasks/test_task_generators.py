"""Generator invariants: exact formats, label correctness against a brute-force recomputation, determinism."""

import numpy as np
import pytest
import torch

from mamba_interp.tasks import IGNORE, TaskBatch, get_task, task_names
from mamba_interp.tasks.base import masked_accuracy

SYNTHETIC = ["induction", "mqar", "selective_copy", "modular_addition", "parity"]


# ---- induction: the format other checks rely on ----------------------------------------------------
@pytest.mark.parametrize("vocab_size,seq_len", [(16, 64), (16, 3), (4, 5), (16, 1024), (32, 17)])
def test_induction_format_exact(vocab_size, seq_len):
    task = get_task("induction", vocab_size=vocab_size, seq_len=seq_len)
    batch = task.sample(300 if seq_len < 1024 else 40, seed=3)
    tok, tgt, md = batch.tokens, batch.targets, batch.metadata
    trig = vocab_size - 1
    assert tok.dtype == torch.long and tok.shape == (len(batch), seq_len)
    assert int(tok.min()) >= 1, "token 0 is padding and must never appear"
    assert int(tok.max()) <= trig
    assert ((tok == trig).sum(1) == 2).all(), "the trigger appears exactly twice"
    assert (tok[:, -1] == trig).all()
    rows = torch.arange(len(batch))
    p = md["trigger_pos"]
    assert ((p >= 0) & (p <= seq_len - 3)).all()
    assert (tok[rows, p] == trig).all()
    assert (md["value_pos"] == p + 1).all()
    x = tok[rows, p + 1]
    assert ((x >= 1) & (x <= vocab_size - 2)).all()
    assert torch.equal(md["answer"], x)
    assert (md["query_pos"] == seq_len - 1).all() and (md["answer_pos"] == seq_len - 1).all()
    assert torch.equal(md["distance"], seq_len - 2 - p)
    # the only target is X at the last position, and it is the only scored position
    assert torch.equal(tgt[:, -1], x)
    assert (tgt[:, :-1] == IGNORE).all()
    assert batch.eval_mask[:, -1].all() and not batch.eval_mask[:, :-1].any()


def test_induction_distributions_are_uniform():
    task = get_task("induction", vocab_size=16, seq_len=32)
    batch = task.sample(4000, seed=0)
    tok = batch.tokens
    content = tok[tok != 15]
    counts = torch.bincount(content, minlength=16)[1:15].float()
    assert counts.min() / counts.max() > 0.9  # 14 content tokens, ~8900 draws each
    pos_counts = torch.bincount(batch.metadata["trigger_pos"], minlength=30).float()
    assert len(pos_counts) == 30 and pos_counts.min() > 0.6 * pos_counts.mean()  # p uniform on 0..L-3
    answers = torch.bincount(batch.metadata["answer"], minlength=16)[1:15].float()
    assert answers.min() > 0.6 * answers.mean()


def test_induction_corrupt_changes_only_the_answer():
    task = get_task("induction")
    batch = task.sample(200, seed=1)
    bad = task.corrupt(batch, seed=2)
    diff = bad.tokens != batch.tokens
    assert (diff.sum(1) == 1).all()
    rows = torch.arange(len(batch))
    assert diff[rows, batch.metadata["value_pos"]].all()
    assert (bad.metadata["answer"] != batch.metadata["answer"]).all()
    assert ((bad.metadata["answer"] >= 1) & (bad.metadata["answer"] <= 14)).all()
    assert torch.equal(bad.targets[:, -1], bad.metadata["answer"])


# ---- MQAR (Zoology layout) ---------------------------------------------------------------------------
@pytest.mark.parametrize("random_non_queries", [False, True])
def test_mqar_layout_and_labels(random_non_queries):
    v, l, k = 32, 32, 4
    task = get_task("mqar", vocab_size=v, seq_len=l, num_kv_pairs=k, random_non_queries=random_non_queries)
    batch = task.sample(200, seed=5)
    tok, tgt, md = batch.tokens.numpy(), batch.targets.numpy(), batch.metadata
    keys, values, qpos = md["keys"].numpy(), md["values"].numpy(), md["query_pos"].numpy()
    for i in range(len(batch)):
        assert len(set(keys[i])) == k and len(set(values[i])) == k
        assert keys[i].min() >= 1 and keys[i].max() <= v // 2 - 1
        assert values[i].min() >= v // 2 and values[i].max() <= v - 1
        assert list(tok[i, 0 : 2 * k : 2]) == list(keys[i]) and list(tok[i, 1 : 2 * k : 2]) == list(values[i])
        assert len(set(qpos[i])) == k and (qpos[i] >= 2 * k).all() and ((qpos[i] - 2 * k) % 2 == 0).all()
        # brute force: each labelled position holds a key, and its label is the value bound to it in context
        binding = dict(zip(tok[i, 0 : 2 * k : 2], tok[i, 1 : 2 * k : 2]))
        labelled = np.flatnonzero(tgt[i] != IGNORE)
        assert sorted(labelled) == sorted(qpos[i])
        for pos in labelled:
            assert tgt[i, pos] == binding[tok[i, pos]]
        if not random_non_queries:
            rest = np.setdiff1d(np.arange(2 * k, l), qpos[i])
            assert (tok[i, rest] == 0).all()
    assert torch.equal(md["answer"], md["values"]) and torch.equal(md["answer_pos"], md["query_pos"])


def test_mqar_gaps_follow_the_power_law():
    task = get_task("mqar", vocab_size=64, seq_len=64, num_kv_pairs=2, random_non_queries=False)
    gaps = ((task.sample(3000, seed=0).metadata["query_pos"] - 4) // 2).flatten()
    counts = torch.bincount(gaps, minlength=30).float()
    assert counts[0] > counts[5] > counts[25]  # power_a = 0.01: short gaps dominate
    uniform = get_task("mqar", vocab_size=64, seq_len=64, num_kv_pairs=2, power_a=1.0)
    ucounts = torch.bincount(((uniform.sample(3000, 0).metadata["query_pos"] - 4) // 2).flatten()).float()
    assert ucounts.min() > 0.6 * ucounts.mean()


# ---- selective copy ----------------------------------------------------------------------------------
def test_selective_copy_layout_and_labels():
    task = get_task("selective_copy", seq_len=24, num_data=4, num_colors=6)
    batch = task.sample(300, seed=7)
    tok, tgt, md = batch.tokens, batch.targets, batch.metadata
    assert task.vocab_size == 8 and (tok[:, -4:] == 7).all()
    body = tok[:, :-4]
    assert ((body == 0) | ((body >= 1) & (body <= 6))).all()
    for i in range(len(batch)):
        nz = torch.nonzero(body[i]).flatten()
        assert torch.equal(nz, md["data_pos"][i])
        assert torch.equal(body[i, nz], md["data"][i])
        assert torch.equal(tgt[i, -4:], md["data"][i])
    assert (tgt[:, :-4] == IGNORE).all()
    assert torch.equal(md["is_data"][:, :-4], body != 0) and not md["is_data"][:, -4:].any()
    assert (md["marker_pos"] == torch.arange(20, 24)).all()


# ---- modular addition --------------------------------------------------------------------------------
def test_modular_addition_split_and_labels():
    task = get_task("modular_addition", p=13, frac_train=0.4, split_seed=3)
    train, test, full = (task.sample(None, 0, split=s) for s in ("train", "test", "all"))
    assert task.vocab_size == 14 and task.seq_len == 3
    assert len(train) == round(0.4 * 169) and len(train) + len(test) == 169
    assert set(train.metadata["pair_index"].tolist()).isdisjoint(test.metadata["pair_index"].tolist())
    assert torch.equal(full.metadata["pair_index"], torch.arange(169))  # the p x p grid in a*p + b order
    for batch in (train, test, full):
        a, b = batch.tokens[:, 0], batch.tokens[:, 1]
        assert (batch.tokens[:, 2] == 13).all()
        assert torch.equal(batch.targets[:, 2], (a + b) % 13)
        assert (batch.targets[:, :2] == IGNORE).all()
        assert torch.equal(batch.metadata["a"] * 13 + batch.metadata["b"], batch.metadata["pair_index"])
    assert train.metadata["is_train"].all() and not test.metadata["is_train"].any()
    sub = task.sample(20, seed=1, split="test")
    assert set(sub.metadata["pair_index"].tolist()) <= set(test.metadata["pair_index"].tolist())
    other = get_task("modular_addition", p=13, frac_train=0.4, split_seed=4).sample(None, 0)
    assert not torch.equal(other.metadata["pair_index"], train.metadata["pair_index"])
    with pytest.raises(ValueError, match="split"):
        task.sample(500, seed=0, split="train")
    with pytest.raises(ValueError, match="seq_len"):
        task.sample(None, 0, seq_len=5)


# ---- parity ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train_targets", ["all", "last"])
def test_parity_labels(train_targets):
    task = get_task("parity", seq_len=12, train_targets=train_targets)
    batch = task.sample(100, seed=0, seq_len=40)
    bits = batch.tokens
    brute = torch.tensor([[int(bits[i, : t + 1].sum()) % 2 for t in range(40)] for i in range(len(batch))])
    assert torch.equal(batch.metadata["running_parity"], brute)
    assert torch.equal(batch.metadata["answer"], brute[:, -1])
    if train_targets == "all":
        assert torch.equal(batch.targets, brute)
    else:
        assert (batch.targets[:, :-1] == IGNORE).all() and torch.equal(batch.targets[:, -1], brute[:, -1])
    assert batch.eval_mask[:, -1].all() and batch.eval_mask.sum() == len(batch)


# ---- shared properties ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SYNTHETIC)
def test_determinism_per_seed_and_split(name):
    task = get_task(name)
    n = None if task.finite else 16
    split = "test" if task.finite else "train"
    a, b = task.sample(n if n else 30, 11, split=split), task.sample(n if n else 30, 11, split=split)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
    for key, value in a.metadata.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b.metadata[key])
    c = task.sample(n if n else 30, 12, split=split)
    assert not torch.equal(a.tokens, c.tokens)
    if not task.finite:
        test = task.sample(16, 11, split="test")
        assert not torch.equal(a.tokens, test.tokens), "train and test streams must differ for the same seed"
    torch.manual_seed(0)
    x = task.sample(n if n else 30, 11, split=split).tokens
    torch.manual_seed(1)
    np.random.seed(1)
    assert torch.equal(x, task.sample(n if n else 30, 11, split=split).tokens), "global RNG must not matter"


@pytest.mark.parametrize("name", SYNTHETIC)
def test_common_metadata_and_shapes(name):
    task = get_task(name)
    batch = task.sample(None if task.finite else 8, 0)
    assert isinstance(batch, TaskBatch) and batch.task == name
    assert batch.tokens.dtype == torch.long and batch.targets.dtype == torch.long
    assert int(batch.tokens.max()) < task.vocab_size and int(batch.tokens.min()) >= 0
    assert batch.tokens.shape[1] == task.seq_len
    md = batch.metadata
    assert "answer" in md and "answer_pos" in md
    ans, pos = md["answer"], md["answer_pos"]
    assert ans.shape == pos.shape and ans.shape[0] == len(batch)
    rows = torch.arange(len(batch))[:, None] if ans.dim() == 2 else torch.arange(len(batch))
    assert torch.equal(batch.targets[rows, pos], ans), "the target at answer_pos is the answer"
    assert batch.eval_mask[rows, pos].all()
    # the card's spec() round-trips through get_task
    again = get_task(name, **task.spec())
    assert again.params == task.params


def test_registry_and_parameter_errors():
    assert set(SYNTHETIC + ["text_induction", "ioi", "factual_recall"]) <= set(task_names())
    with pytest.raises(ValueError, match="known tasks"):
        get_task("copying")
    with pytest.raises(ValueError, match="no parameter"):
        get_task("induction", vocab=16)
    with pytest.raises(ValueError, match="vocab_size"):
        get_task("induction", vocab_size=3)
    with pytest.raises(ValueError, match="seq_len"):
        get_task("mqar", seq_len=20, num_kv_pairs=8)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        get_task("mqar", vocab_size=10, num_kv_pairs=8)
    with pytest.raises(ValueError, match="frac_train"):
        get_task("modular_addition", frac_train=1.0)
    with pytest.raises(ValueError, match="does not match"):
        get_task("modular_addition", p=31, vocab_size=40)
    with pytest.raises(ValueError, match="split"):
        get_task("induction").sample(4, 0, split="valid")
    with pytest.raises(ValueError, match="seed"):
        get_task("induction").sample(4, -1)


def test_accuracy_and_loss_on_planted_logits():
    task = get_task("mqar", vocab_size=32, seq_len=32, num_kv_pairs=4)
    batch = task.sample(50, 0)
    safe = batch.targets.clamp(min=0)
    perfect = torch.nn.functional.one_hot(safe, 32).float() * 20
    assert task.accuracy(perfect, batch) == 1.0
    assert float(task.loss(perfect, batch)) < 1e-6
    wrong = torch.nn.functional.one_hot((safe + 1) % 32, 32).float() * 20
    assert task.accuracy(wrong, batch) == 0.0
    # half the queries right: 2 of 4 per row
    mixed = wrong.clone()
    pos = batch.metadata["query_pos"][:, :2]
    rows = torch.arange(50)[:, None]
    mixed[rows, pos] = perfect[rows, pos]
    assert task.accuracy(mixed, batch) == pytest.approx(0.5)
    assert task.per_example_correct(perfect, batch).all() and not task.per_example_correct(mixed, batch).any()
    with pytest.raises(ValueError, match="no scored"):
        masked_accuracy(perfect, batch.targets, torch.zeros_like(batch.eval_mask))


def test_batch_select_and_to():
    task = get_task("induction")
    batch = task.sample(10, 0)
    sub = batch.select([1, 3])
    assert torch.equal(sub.tokens, batch.tokens[[1, 3]])
    assert torch.equal(sub.metadata["answer"], batch.metadata["answer"][[1, 3]])
    assert sub.metadata["trigger_token"] == 15
    assert len(batch.select(slice(0, 4))) == 4
    assert batch.to("cpu").tokens.device.type == "cpu"

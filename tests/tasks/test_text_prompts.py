"""Text prompt sets through locally built tokenizers (no hub): positions, answers, padding, errors."""

import pytest
import torch

from mamba_interp.tasks import IGNORE, TokenizerUnavailableError, get_task, load_tokenizer
from mamba_interp.tasks.text import FACTS, IOI_NAMES, builtin_words, encode_template


def _word_level():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2}
    for w in builtin_words() + ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", unk_token="<unk>")


def _byte_bpe():
    """A byte-level BPE (GPT-2 style: the leading space belongs to the word) trained on the prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mamba_interp.tasks.text import IOI_OBJECTS, IOI_PLACES, IOI_TEMPLATES

    corpus = []
    for i, t in enumerate(IOI_TEMPLATES):
        for j, name in enumerate(IOI_NAMES):
            corpus.append(t.format(A=name, B=IOI_NAMES[j - 1], C=name, PLACE=IOI_PLACES[(i + j) % 8],
                                   OBJECT=IOI_OBJECTS[(i * j) % 8]))
    corpus += [f[1].format(SUBJECT=f[2]) + " " + f[3] for f in FACTS] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.fixture(scope="module", params=["wordlevel", "bpe"])
def tokenizer(request):
    return _word_level() if request.param == "wordlevel" else _byte_bpe()


def test_text_induction(tokenizer):
    task = get_task("text_induction", tokenizer=tokenizer, half_len=10)
    batch = task.sample(16, seed=0)
    tok = batch.tokens
    assert tok.shape == (16, 20)
    assert torch.equal(tok[:, :10], tok[:, 10:])
    special = set(tokenizer.all_special_ids)
    assert not any(int(t) in special for t in tok.flatten())
    pos, ans = batch.metadata["answer_pos"], batch.metadata["answer"]
    assert pos.shape == (16, 9) and (pos[0] == torch.arange(10, 19)).all()
    rows = torch.arange(16)[:, None]
    assert torch.equal(tok[rows, pos + 1], ans) and torch.equal(batch.targets[rows, pos], ans)
    assert torch.equal(tok[rows, batch.metadata["source_pos"]], ans)  # the earlier copy of the answer
    assert (batch.targets[:, :10] == IGNORE).all() and (batch.targets[:, -1] == IGNORE).all()
    bad = task.corrupt(batch, seed=1)
    assert torch.equal(bad.tokens[:, 10:], tok[:, 10:]) and not torch.equal(bad.tokens[:, :10], tok[:, :10])
    with_bos = get_task("text_induction", tokenizer=tokenizer, half_len=10, prepend_bos=True).sample(4, 0)
    assert (with_bos.tokens[:, 0] == tokenizer.bos_token_id).all() and with_bos.tokens.shape == (4, 21)


def test_ioi_positions_and_answers(tokenizer):
    task = get_task("ioi", tokenizer=tokenizer)
    batch = task.sample(40, seed=3)
    tok, md = batch.tokens, batch.metadata
    rows = torch.arange(40)
    assert torch.equal(tok[rows, md["io_pos"]], md["io_token"])
    assert torch.equal(tok[rows, md["s1_pos"]], md["s_token"])
    assert torch.equal(tok[rows, md["s2_pos"]], md["s_token"])
    assert (md["io_token"] != md["s_token"]).all()
    assert (md["s2_pos"] > torch.maximum(md["io_pos"], md["s1_pos"])).all()
    assert torch.equal(batch.targets[:, -1], md["io_token"]) and (batch.targets[:, :-1] == IGNORE).all()
    assert set(md["order"]) == {"ABBA", "BABA"}
    for i in range(40):
        abba = md["order"][i] == "ABBA"
        assert (md["io_pos"][i] < md["s1_pos"][i]) == abba
        # left padding: the mask covers exactly the prompt, which decodes to the recorded text
        n_real = int(batch.attention_mask[i].sum())
        assert batch.attention_mask[i, -n_real:].all() and not batch.attention_mask[i, :-n_real].any()
        ids = tok[i, -n_real:].tolist()
        assert "".join(tokenizer.decode(ids).split()) == "".join(md["text"][i].split())
    bad = task.corrupt(batch, seed=0)
    changed = (bad.tokens != tok).sum(1)
    assert (changed == 1).all()
    assert not (bad.tokens[rows, md["s2_pos"]] == md["s_token"]).any()
    assert not (bad.tokens[rows, md["s2_pos"]] == md["io_token"]).any()
    logits = torch.zeros(40, tok.shape[1], task.vocab_size)
    logits[rows, -1, md["io_token"]] = 2.0
    assert torch.allclose(task.logit_diff(logits, batch), torch.full((40,), 2.0))
    assert task.accuracy(logits, batch) == 1.0


def test_bpe_segments_match_whole_text_encoding():
    tok = _byte_bpe()
    ids, spans = encode_template(tok, "When {A} and {B} went to the {PLACE}, {C} gave a {OBJECT} to",
                                 {"A": "Mary", "B": "John", "C": "John", "PLACE": "store", "OBJECT": "drink"})
    text = "When Mary and John went to the store, John gave a drink to"
    assert ids == tok.encode(text, add_special_tokens=False)
    assert [s[0] for s in spans] == ["A", "B", "PLACE", "C", "OBJECT"]
    assert tok.decode(ids[spans[0][1] : spans[0][2]]) == " Mary"


def test_factual_recall(tokenizer):
    task = get_task("factual_recall", tokenizer=tokenizer)
    batch = task.sample(len(FACTS), seed=0)
    md = batch.metadata
    assert sorted(md["fact_id"].tolist()) == list(range(len(FACTS)))  # without replacement while facts last
    for i in range(len(batch)):
        first, last = int(md["subject_first_pos"][i]), int(md["subject_last_pos"][i])
        assert tokenizer.decode(batch.tokens[i, first : last + 1].tolist()).strip() == md["subject"][i]
        assert int(md["answer"][i]) == tokenizer.encode(" " + md["answer_text"][i], add_special_tokens=False)[0]
    assert torch.equal(batch.targets[:, -1], md["answer"])
    assert (md["answer_pos"] == batch.tokens.shape[1] - 1).all()


def test_factual_recall_corrupted_partner(tokenizer):
    task = get_task("factual_recall", tokenizer=tokenizer)
    batch = task.sample(len(FACTS), seed=0)
    bad = task.corrupt(batch, seed=3)
    md = batch.metadata
    assert bad.tokens.shape == batch.tokens.shape and torch.equal(bad.attention_mask, batch.attention_mask)
    changed = (bad.tokens != batch.tokens)
    pos = torch.arange(batch.tokens.shape[1])[None]
    in_subject = (pos >= md["subject_first_pos"][:, None]) & (pos <= md["subject_last_pos"][:, None])
    assert not bool((changed & ~in_subject).any())  # only subject tokens change
    assert bool(changed.any(1).all())
    same_relation = bad.metadata["answer"] >= 0
    assert bool(same_relation.any())
    assert bool((bad.metadata["answer"][same_relation] != md["answer"][same_relation]).all())
    assert torch.equal(task.corrupt(batch, seed=3).tokens, bad.tokens)


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerUnavailableError, match="offline"):
        load_tokenizer(tmp_path / "no-such-tokenizer")
    with pytest.raises(TokenizerUnavailableError, match="offline"):
        get_task("ioi", tokenizer="state-spaces/not-cached-anywhere")
    with pytest.raises(ValueError, match="tokenizer="):
        get_task("ioi")
    tok = _word_level()
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.encode(" Mary", add_special_tokens=False) == tok.encode(" Mary", add_special_tokens=False)
    with pytest.raises(ValueError, match="single tokens"):
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        chars = Tokenizer(models.WordLevel({c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyzMJ ,.<>")},
                                           unk_token="<"))
        chars.pre_tokenizer = pre_tokenizers.Split("", "isolated")
        get_task("ioi", tokenizer=PreTrainedTokenizerFast(tokenizer_object=chars)).sample(2, 0)

import pytest
import torch
import torch.nn as nn

import data
import model as M
import structured as S

TEXTS = ["take plate", "take plate", "take cup", "open fridge door", "wash", "put-down coffee maker", "cut", ""]


def tiny(layout="grid"):
    return M.load_model("tiny", action_tokens=1, n_verbs=5, n_nouns=6, n_actions=7, video_layout=layout).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


def make_batch(model, questions, n_frames=2):
    """Prompt-only rows the way evaluate.py builds them (encode_conversation with answer None, then collate)."""
    g = torch.Generator().manual_seed(0)
    items = []
    for i, q in enumerate(questions):
        ids, labels = data.encode_conversation(model.tokenizer, q, None, model.spec.video_tokens(n_frames),
                                               model.cfg.action_tokens)
        frames = torch.randint(0, 256, (n_frames, 40, 48, 3), dtype=torch.uint8, generator=g)
        items.append(dict(index=i, input_ids=torch.tensor(ids), labels=torch.tensor(labels), clamped=0, bad=None,
                          pixel_values_videos=data.preprocess_frames(frames, model.spec.size, model.spec.mean,
                                                                     model.spec.std),
                          action_labels=torch.full((3,), -100)))
    return data.collate(items, model.tokenizer.pad_token_id)


def right_padded(batch):
    """Every row a different length, so padding is really exercised."""
    n = batch["attention_mask"].sum(1).tolist()
    return len(set(n)) == len(n)


def full_logprobs(model, batch, b, continuation=()):
    """Reference: one full forward of row b unpadded (plus a continuation), fp32 log-probs at every position."""
    n = int(batch["attention_mask"][b].sum())
    ids = torch.cat([batch["input_ids"][b, :n], torch.tensor(continuation, dtype=torch.long)])[None]
    row = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
               pixel_values_videos=batch["pixel_values_videos"][b:b + 1])
    logits = model.llava.lm_head(model.llava.model(**model.lm_inputs(row)).last_hidden_state)[0]
    return logits.float().log_softmax(-1), n


def test_letter_ids_and_parse():
    tok = M.build_tokenizer_tiny()
    ids = S.letter_token_ids(tok, 5)
    assert tok.convert_ids_to_tokens(ids.tolist()) == list("ABCDE")
    assert tok("C. take plate", add_special_tokens=False).input_ids[0] == ids[2]
    assert S.parse_letter("B. take plate", 5) == 1
    assert S.parse_letter("(C)", 5) == 2 and S.parse_letter("Answer: D.", 5) == 3
    assert S.parse_letter("F. wash cup", 5) == -1 and S.parse_letter("take plate", 5) == -1


def test_letter_scores_pick_the_letter_a_hand_built_head_prefers():
    model = tiny()
    llava, ids = model.llava, S.letter_token_ids(model.tokenizer, 5)
    head = nn.Linear(llava.lm_head.in_features, llava.lm_head.out_features)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    head.bias.data[ids[2]] = 5.0  # every position says "C"
    llava.lm_head = head
    batch = make_batch(model, [data.mqa_question(["take plate", "open fridge", "wash cup", "cut onion", "put lid"]),
                               data.mqa_question(["a", "b", "c", "d", "e"])])
    scores = S.score_options(model, batch, 5)
    assert scores.argmax(-1).tolist() == [2, 2]
    expected = torch.tensor([0, 0, 5.0, 0, 0]).log_softmax(-1)
    torch.testing.assert_close(scores, expected.expand(2, 5))


def test_score_options_equals_full_forward_at_last_real_position(model):
    batch = make_batch(model, [data.mqa_question(["take plate", "open the fridge door now", "wash cup and plate"]),
                               data.mqa_question(["cut", "mix", "pour"]),
                               data.mqa_question(["put-down coffee maker on the counter", "dry hands", "open tap"])])
    assert right_padded(batch)
    scores = S.score_options(model, batch, 3)
    ids = S.letter_token_ids(model.tokenizer, 3)
    for b in range(3):
        lp, n = full_logprobs(model, batch, b)
        torch.testing.assert_close(scores[b], lp[n - 1, ids].log_softmax(-1), atol=1e-5, rtol=0)


def test_candidate_trie_feeds_each_shared_prefix_once():
    trie = S.build_candidate_trie([[1, 2, 9], [1, 2, 9], [1, 3, 9], [4, 9], [9]])
    assert trie.tokens.tolist() == [1, 2, 3, 4]  # prefixes (1), (1,2), (1,3), (4); last tokens never fed
    assert trie.depth.tolist() == [0, 1, 1, 0]
    assert trie.ancestors.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]]
    assert trie.where.tolist() == [[0, 1], [0, 1], [0, 2], [3, -1], [-1, -1]]


@pytest.mark.parametrize("attn, layout", [("sdpa", "grid"), ("eager", "hf")])
def test_multi_round_equals_one_full_forward_per_candidate(attn, layout):
    model = tiny(layout)
    model.llava.set_attn_implementation(attn)
    batch = make_batch(model, [data.direct_question(), "What is in the video? " + data.DIRECT_PROMPT])
    assert right_padded(batch)
    candidates = S.candidate_token_ids(model.tokenizer, TEXTS)
    assert len({len(c) for c in candidates}) > 3 and candidates[-1] == [model.tokenizer.eos_token_id]
    mean = S.score_candidates(model, batch, candidates, chunk=3)
    total = S.score_candidates(model, batch, candidates, chunk=3, reduce="sum")
    for b in range(2):
        for j, c in enumerate(candidates):
            lp, n = full_logprobs(model, batch, b, c)
            token_lp = lp[n - 1 + torch.arange(len(c)), torch.tensor(c)]
            torch.testing.assert_close(total[b, j], token_lp.sum(), atol=1e-4, rtol=0)
            torch.testing.assert_close(mean[b, j], token_lp.mean(), atol=1e-4, rtol=0)
    # one-token candidates only: scored by the prefill alone, no continuation pass
    end_only = S.score_candidates(model, batch, [candidates[-1]])
    torch.testing.assert_close(end_only, mean[:, -1:], atol=1e-5, rtol=0)


def test_option_texts_equal_a_full_forward_per_option(model):
    """--score text: each row's options scored as whole answers (their tokens plus <|im_end|>), mean
    log-likelihood, against one full forward of the prompt plus each option; rows with different options."""
    options = [["take plate", "open the fridge door", "wash cup", "cut"],
               ["put-down coffee maker", "cut", "mix", "dry hands"]]
    batch = make_batch(model, [data.mqa_question(o) for o in options])
    assert right_padded(batch)
    for reduce in ("mean", "sum"):
        scores = S.score_option_texts(model, batch, options, chunk=3, reduce=reduce)
        assert scores.shape == (2, 4)
        for b, row in enumerate(options):
            for j, text in enumerate(row):
                c = S.candidate_token_ids(model.tokenizer, [text])[0]
                lp, n = full_logprobs(model, batch, b, c)
                token_lp = lp[n - 1 + torch.arange(len(c)), torch.tensor(c)]
                torch.testing.assert_close(scores[b, j], token_lp.mean() if reduce == "mean" else token_lp.sum(),
                                           atol=1e-5, rtol=0)


def test_option_texts_pick_what_a_hand_set_model_finds_likely():
    """With an LM head that only ever says 'cup', the option 'cup' wins, wherever it stands."""
    model = tiny()
    cup, end = model.tokenizer(" cup", add_special_tokens=False).input_ids, model.tokenizer.eos_token_id
    head = nn.Linear(model.llava.lm_head.in_features, model.llava.lm_head.out_features)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    head.bias.data[cup + [end]] = 8.0
    model.llava.lm_head = head
    options = [[" plate", " cup", " pan"], [" cup", " plate", " pan"], [" pan", " plate", " cup"]]
    batch = make_batch(model, [data.mqa_question(o) for o in options])
    assert S.score_option_texts(model, batch, options).argmax(-1).tolist() == [1, 0, 2]


def test_generate_answer_batched_equals_one_by_one(model):
    batch = make_batch(model, [data.mqa_question(["take plate", "open fridge"]), data.direct_question()])
    assert right_padded(batch)
    answers = S.generate_answer(model, batch, max_new_tokens=6)
    for b in range(2):
        n = int(batch["attention_mask"][b].sum())
        row = dict(input_ids=batch["input_ids"][b:b + 1, :n], attention_mask=batch["attention_mask"][b:b + 1, :n],
                   pixel_values_videos=batch["pixel_values_videos"][b:b + 1])
        assert S.generate_answer(model, row, max_new_tokens=6) == [answers[b]]


def test_generate_and_parse_reads_the_letter_a_hand_set_model_writes():
    """--score generate: an LM head that writes "B" then ends is read as option B on every row."""
    model = tiny()
    letter, end = model.tokenizer("B", add_special_tokens=False).input_ids[0], model.tokenizer.eos_token_id
    head = nn.Linear(model.llava.lm_head.in_features, model.llava.lm_head.out_features)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    head.bias.data[letter], head.bias.data[end] = 9.0, 8.0
    model.llava.lm_head = head
    batch = make_batch(model, [data.mqa_question(["take plate", "open fridge"]), data.mqa_question(["a", "b", "c"])])
    answers = S.generate_answer(model, batch, max_new_tokens=1)
    assert answers == ["B", "B"] and [S.parse_letter(a, 2) for a in answers] == [1, 1]

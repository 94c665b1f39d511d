"""Structured action prediction (paper 4.3): score lettered options, score option texts and many action texts
against one cached prefix (multi-round appending), generate and parse an answer.

Batches come from data.collate: prompts right-padded, each ending with "<|im_start|>assistant\n", so the next-token
distribution at a row's last real position (length - 1) is that of its answer's first token. One prompt forward per
batch of clips; nothing is generated unless asked. Options are scored by letter (the paper's protocol: the K letters'
next-token logits) or by text (each text as the whole answer to one cached prompt, lm-eval-harness's multiple_choice).
"""
import re
from dataclasses import dataclass

import torch
import transformers  # DynamicCache loads on first use

from data import IM_END, LETTERS


def letter_token_ids(tokenizer, k) -> torch.LongTensor:
    """Ids of "A".."K" as the first token of an answer "A. take plate" (Qwen2 and the tiny BPE split letters
    from punctuation; checked, since a tokenizer that merged "A." would silently score the wrong token)."""
    ids = [tokenizer(f"{c}. x", add_special_tokens=False).input_ids[0] for c in LETTERS[:k]]
    for c, i in zip(LETTERS, ids):
        if tokenizer.decode([i]).strip() != c:
            raise ValueError(f"the answer {c!r}. starts with token {tokenizer.decode([i])!r}, not the letter alone")
    return torch.tensor(ids)


def prefill(model, batch, cache=None) -> torch.Tensor:
    """One forward over the prompts (video features and the <action> embedding hook apply here, and only here):
    fp32 log-probs (B, V) of the next token at each row's last real position. The LM head runs on those B
    states only, never on (B, L, V). With a cache, it keeps every prompt position, padding included."""
    inputs = model.lm_inputs(batch)
    h = model.llava.model(**inputs, past_key_values=cache, use_cache=cache is not None).last_hidden_state
    last = inputs["attention_mask"].sum(1) - 1
    return model.llava.lm_head(h[torch.arange(len(h), device=h.device), last]).float().log_softmax(-1)


@torch.no_grad()
def score_options(model, batch, n_options) -> torch.Tensor:
    """MQA and two-stage: (B, K) log-softmax over the option letters' next-token logits at the answer position.
    One forward per batch and no decoding, so there are no unparseable answers. (The letters' log-probs over
    the full vocabulary, renormalised over K, equal the log-softmax of the K letter logits.)"""
    ids = letter_token_ids(model.tokenizer, n_options).to(model.llava.device)
    return prefill(model, batch)[:, ids].log_softmax(-1)


def candidate_token_ids(tokenizer, texts) -> list[list[int]]:
    """Each action text's tokens plus <|im_end|>, which makes it a whole answer ("take" cannot win on the first token of
    "take plate") and which the paper's per-candidate cross-entropy (the answer's loss, end token included) covers."""
    end = tokenizer.convert_tokens_to_ids(IM_END)
    return [ids + [end] for ids in tokenizer(list(texts), add_special_tokens=False).input_ids]


@dataclass
class Trie:
    tokens: torch.LongTensor     # (N,) the token fed at each node
    depth: torch.LongTensor      # (N,) its offset after the prompt
    ancestors: torch.BoolTensor  # (N, N) node i may attend to node j: j is i or an ancestor of i
    where: torch.LongTensor      # (C, M-1) node whose output predicts candidate c's token j + 1; -1 = padding


def build_candidate_trie(candidates) -> Trie:
    """Nodes are the distinct proper prefixes of the candidates, the only positions whose next-token logits are
    needed: a first token is predicted by the prompt's last position, a last token (<|im_end|>) is never fed,
    and a shared prefix ("take" of "take plate", "take cup") is fed once. On EPIC's 3,806 labels, counting a
    token per word, that is 4.0k fed positions instead of 7.8k."""
    index, tokens, parents, where = {}, [], [], []
    width = max(map(len, candidates)) - 1
    for cand in candidates:
        row, parent = [], -1
        for j in range(1, len(cand)):
            key = tuple(cand[:j])
            if key not in index:
                index[key] = len(tokens)
                tokens.append(cand[j - 1])
                parents.append(parent)
            parent = index[key]
            row.append(parent)
        where.append(row + [-1] * (width - len(row)))
    n = len(tokens)
    parents = torch.tensor(parents, dtype=torch.long)
    ancestors, depth = torch.eye(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long)
    nodes, up = torch.arange(n), parents.clone()
    while (up >= 0).any():  # climb one level per step: max depth steps, vectorised over nodes
        ok = up >= 0
        ancestors[nodes[ok], up[ok]] = True
        depth += ok
        up = torch.where(ok, parents[up.clamp(min=0)], -1)
    return Trie(torch.tensor(tokens, dtype=torch.long), depth, ancestors, torch.tensor(where, dtype=torch.long))


@torch.no_grad()
def score_candidates(model, batch, candidates, chunk=256, reduce="mean") -> torch.Tensor:
    """Multi-round appending (paper 4.3): (B, C) log-likelihood of each candidate (token lists from candidate_token_ids)
    as the answer to each prompt, HIGHER is better: reduce="mean" is the mean log-prob over its tokens (the paper's
    lowest-mean-cross-entropy criterion), "sum" the total (favours short candidates).

    The prompt (video + question) is prefilled ONCE per batch into a DynamicCache; candidates then go in passes
    of `chunk` (sorted, deduplicated) as one packed prefix trie per pass, every clip at once: each node attends
    to its clip's whole prompt (padding masked out) and to its own ancestors through a 4-D mask, at position
    prompt length + depth, so the prompt is never recomputed nor copied per candidate (an expanded cache would
    copy the ~6k-token prefix `chunk` times). The new keys are cropped off the cache after each pass. Right
    padding needs no care beyond that: each row's prompt length sets its positions and its last logit."""
    assert reduce in ("mean", "sum")
    llava = model.llava
    cache = transformers.DynamicCache(config=llava.config.text_config)
    first = prefill(model, batch, cache)  # (B, V): predicts every candidate's first token
    dev, dtype = first.device, llava.lm_head.weight.dtype
    prompt = batch["attention_mask"].to(dev).bool()
    (B, P), lengths = prompt.shape, prompt.sum(1, keepdim=True)
    uniq = sorted(set(map(tuple, candidates)))  # sorted: shared prefixes fall in the same pass
    scores = []
    for i in range(0, len(uniq), chunk):
        part = uniq[i:i + chunk]
        trie = build_candidate_trie(part)
        tok = torch.tensor([c + (0,) * (trie.where.shape[1] + 1 - len(c)) for c in part], device=dev)
        where = trie.where.to(dev)
        lp = first[:, tok[:, 0]]
        if n := len(trie.tokens):  # else every candidate is one token, scored by the prefill alone
            tree = trie.ancestors.to(dev).expand(B, 1, n, n)
            attend = torch.cat([prompt[:, None, None].expand(B, 1, n, P), tree], -1)
            bias = torch.zeros(attend.shape, dtype=dtype, device=dev).masked_fill_(~attend, torch.finfo(dtype).min)
            h = llava.model.language_model(input_ids=trie.tokens.to(dev).expand(B, n), attention_mask=bias,
                                           position_ids=lengths + trie.depth.to(dev), past_key_values=cache,
                                           use_cache=True).last_hidden_state
            cache.crop(-n)
            logits = llava.lm_head(h).float()  # (B, n, V), n ~ chunk: the nodes are all that is fed
            node = where.clamp(min=0)
            rest = logits[:, node, tok[:, 1:]] - logits.logsumexp(-1)[:, node]  # (B, c, M-1)
            lp = lp + rest.masked_fill(where < 0, 0).sum(-1)
        scores.append(lp / (1 + (where >= 0).sum(-1)) if reduce == "mean" else lp)
    back = {c: j for j, c in enumerate(uniq)}
    return torch.cat(scores, 1)[:, [back[tuple(c)] for c in candidates]]


@torch.no_grad()
def score_option_texts(model, batch, options, chunk=256, reduce="mean") -> torch.Tensor:
    """Options by text: (B, K) log-likelihood of each row's K option texts (plus <|im_end|>) as the whole answer;
    HIGHER is better. One score_candidates call over the batch's distinct texts: one prefill per clip, the
    options in packed passes. Over a recognizer's top-K this is multi-round appending restricted to those K."""
    texts = sorted({t for row in options for t in row})
    where = {t: j for j, t in enumerate(texts)}
    scores = score_candidates(model, batch, candidate_token_ids(model.tokenizer, texts), chunk, reduce)
    return scores.gather(1, torch.tensor([[where[t] for t in row] for row in options], device=scores.device))


@torch.no_grad()
def generate_answer(model, batch, max_new_tokens=16) -> list[str]:
    """Greedy decoding, for open-ended answers (direct prediction, captions) or generate-and-parse MQA. The
    right-padded prompts are rolled to left padding first: generation appends after each row's last column."""
    inputs, tok = model.lm_inputs(batch), model.tokenizer
    L = inputs["input_ids"].shape[1]
    roll = (torch.arange(L, device=model.llava.device) - (L - inputs["attention_mask"].sum(1, keepdim=True))) % L
    inputs = {k: v.gather(1, roll) if k in ("input_ids", "attention_mask") else v for k, v in inputs.items()}
    out = model.llava.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.convert_tokens_to_ids(IM_END))
    return tok.batch_decode(out[:, L:], skip_special_tokens=True)


def parse_letter(text, k) -> int:
    """Index of the first standalone capital among the first k letters ("B. take", "(B)", "Answer: B" -> 1), or -1."""
    m = re.search(rf"(?<![A-Za-z])([{LETTERS[:k]}])(?![A-Za-z])", text)
    return LETTERS.index(m.group(1)) if m else -1

"""Build the tiny LlamaForCausalLM that the vLLM conformance suite serves (tests/vllm/).

No model can be downloaded, and random weights never emit EOS (every answer would end with
``length`` and nothing would be cacheable). So the weights are set by hand:

- every attention ``o_proj`` and MLP ``down_proj`` is zero, so the residual stream at each
  position is that token's embedding, and the logits depend only on the current token;
- each token of a "chain" gets its own orthogonal embedding direction, and ``lm_head`` maps it
  to the next token of its chain; every other token shares one direction that maps to the first
  token of the plain answer;
- one more direction, shared by every embedding, gives a small constant preference among the
  non-chain tokens (a whole JSON tool call, then the named-tool arguments, then EOS), which is
  what greedy decoding falls back to when vLLM's structured-output grammar masks the chain's
  token (``tool_choice`` required / named).

So greedy decoding (and sampling: the margins are ~40 nats) writes a fixed sentence and then
EOS, finish_reason ``stop``. The chat template picks the chain through its last token:
``<|assistant|>`` -> the plain answer, ``<|call|>`` (tools given) -> a Hermes ``<tool_call>``,
``<|think|>`` (``chat_template_kwargs: {"enable_thinking": true}``) -> ``<think>...</think>``
then the plain answer. The tokenizer is a byte-level BPE trained here, plus added tokens for
the sentence pieces, so each piece is one unique token.

Run with the vLLM venv's python (it has torch and transformers):
    python models/build_tiny_llama.py OUT_DIR
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

ANSWER = ["Hello", "!", " This", " is", " the", " tiny", " test", " model", " speaking", "."]
TOOL_CALL = ["<tool_call>", '{"name": "get_weather", ', '"arguments": {"city": ', '"Paris"}}',
             "</tool_call>"]
THINK = ["<think>", " Thinking", " about", " it", "</think>"]
# what the grammar of tool_choice "required" / named accepts, as single tokens
REQUIRED_JSON = '[{"name": "get_weather", "parameters": {"city": "Paris"}}]'
NAMED_JSON = '{"city": "Paris"}'

SPECIAL = ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|call|>",
           "<|think|>", "<|pad|>"]
EOS = "<|end|>"

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}"
    "<tool_call>{{ call['function']['name'] }}</tool_call>"
    "{%- endfor -%}"
    "{%- endif -%}"
    "<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if enable_thinking is defined and enable_thinking -%}<|think|>"
    "{%- elif tools -%}<|call|>"
    "{%- else -%}<|assistant|>"
    "{%- endif -%}"
    "{%- endif -%}"
)

CORPUS = (
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the "
    "capital of France. Write a short poem about the sea. Summarise this text in one line. "
    "Count from one to ten. Explain how a cache works and why it saves time and money. "
    "Please answer briefly. Tell me a joke about computers. Hello there, how are you today? "
    "def add(a, b): return a + b  # a tiny function; {\"key\": [1, 2, 3]} json data 0123456789"
)


def build(out: Path) -> None:
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 20, trainer)
    pieces = list(dict.fromkeys(ANSWER + TOOL_CALL + THINK + [REQUIRED_JSON, NAMED_JSON]))
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in pieces])
    vocab = tok.get_vocab()
    ids = {p: vocab[p] for p in pieces + SPECIAL}
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token="<|pad|>",
                                     model_max_length=2048)
    hf_tok.chat_template = CHAT_TEMPLATE
    for sentence in (ANSWER, TOOL_CALL, THINK):  # each piece must be one token
        text = "".join(sentence)
        got = hf_tok.encode(text, add_special_tokens=False)
        assert got == [ids[p] for p in sentence], (text, got)

    # chains: token -> next token
    nxt: dict[int, int] = {}

    def chain(start: str, seq: list[str], end: str) -> None:
        toks = [start, *seq, end]
        for a, b in itertools.pairwise(toks):
            nxt[ids[a]] = ids[b]

    chain("<|assistant|>", ANSWER, EOS)
    chain("<|call|>", TOOL_CALL, EOS)
    chain("<|think|>", THINK, ANSWER[0])
    vsize = len(vocab)
    hidden = 128
    chain_tokens = sorted(nxt)
    assert len(chain_tokens) + 2 <= hidden
    other_dir, const_dir = len(chain_tokens), len(chain_tokens) + 1

    cfg = LlamaConfig(vocab_size=vsize, hidden_size=hidden, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, eos_token_id=ids[EOS],
                      pad_token_id=ids["<|pad|>"], bos_token_id=None, torch_dtype="float32")
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb[:, other_dir] = 1.0
        for d, t in enumerate(chain_tokens):
            emb[t, other_dir] = 0.0
            emb[t, d] = 1.0
        emb[:, const_dir] = 1.0
        head = model.lm_head.weight
        # after the final RMSNorm each embedding's two unit entries become 8 (= sqrt(128/2))
        for d, t in enumerate(chain_tokens):
            head[nxt[t], d] = 5.0
        head[ids[ANSWER[0]], other_dir] = 5.0
        for rank, piece in enumerate((REQUIRED_JSON, NAMED_JSON, EOS)):
            head[ids[piece], const_dir] = 0.3 - 0.1 * rank
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    hf_tok.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": ids[EOS]}))

    # self-check with transformers: greedy generation writes each chain then EOS
    def generate(prompt_ids: list[int], n: int = 24) -> list[int]:
        seq = list(prompt_ids)
        with torch.no_grad():
            for _ in range(n):
                logits = model(torch.tensor([seq])).logits[0, -1]
                seq.append(int(logits.argmax()))
                if seq[-1] == ids[EOS]:
                    break
        return seq[len(prompt_ids):]

    def prompt(**kw: Any) -> list[int]:
        text = hf_tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                          add_generation_prompt=True, **kw)
        return list(hf_tok.encode(text, add_special_tokens=False))

    plain = prompt()
    assert hf_tok.decode(generate(plain)) == "".join(ANSWER) + EOS
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    call = prompt(tools=tools)
    assert hf_tok.decode(generate(call)) == "".join(TOOL_CALL) + EOS
    think = prompt(enable_thinking=True)
    assert hf_tok.decode(generate(think)) == "".join(THINK + ANSWER) + EOS
    print(f"tiny llama written to {out} ({vsize} tokens)")


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else "models/build/tiny-llama"))

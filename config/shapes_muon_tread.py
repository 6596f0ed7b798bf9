# Ablation on the shapes set: Muon and TREAD together (config/shapes_muon.py + config/shapes_tread.py).
out_dir = 'out-muon-tread'
optimizer = 'muon'
muon_lr = 1e-3
route_ratio = 0.5
route_start = 1
route_end = -1

import sys, time, torch
from ringlet.models.loader import LoadedStage
from ringlet.models.random_checkpoint import random_weights, shape_config, synthetic_tokenizer
from ringlet.models.registry import build_stage, model_args
from ringlet.worker.engines.torch.engine import TorchEngine
shape = sys.argv[1]
args = model_args(shape_config(shape))
w = random_weights(args, torch.bfloat16, "cuda")
m = build_stage(args, weights=w, dtype=torch.bfloat16, device="cuda"); del w
eng = TorchEngine(LoadedStage(args, m, synthetic_tokenizer(args.vocab_size), 0, args.num_hidden_layers), torch.device("cuda"), max_context=1024)
t=time.time(); eng.decoder.warm(); print("capture", time.time()-t)
tok = torch.tensor([[5]], device="cuda")
for i in range(10): eng.decoder(tok, 200 + i)
torch.cuda.synchronize()
t=time.perf_counter()
for i in range(100): eng.decoder(tok, 200 + i % 50)
torch.cuda.synchronize(); dt=(time.perf_counter()-t)/100
print(f"graph replay only: {1/dt:.1f} steps/s ({dt*1e6:.0f} us)")
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA]) as p:
    for i in range(20): eng.decoder(tok, 200 + i)
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70))

import time, torch, os, sys
sys.path.insert(0, sys.argv[1]) if sys.argv[1] != "new" else None
import nnrnn_fused
op=torch.ops.nnrnn_fused.recurrence; bop=torch.ops.nnrnn_fused.recurrence_backward
torch.set_num_threads(int(sys.argv[2]))
os.environ["NNRNN_CPU_KERNEL"]="blas"
T=100
def med(f, n):
    f(); ts=[]
    for _ in range(5):
        s=time.perf_counter()
        for _ in range(n): f()
        ts.append((time.perf_counter()-s)/n/T*1e6)
    return sorted(ts)[2]
res=[]
for N,B in [(512,100),(512,32),(512,10),(1024,100),(1024,10),(256,256),(384,64)]:
    g=torch.Generator().manual_seed(0)
    x=torch.randn(T,B,N,generator=g); W=torch.linalg.qr(torch.randn(N,N,generator=g))[0]*0.95; b=torch.randn(N,generator=g)*0.01
    og=torch.randn(T,B,N,generator=g); ghn=torch.zeros(B,N)
    n=max(1,int(3e6/(N*N*B)))
    o=op(x,W,b,None,None,"modrelu")[0]
    res.append("%d,%d: %.0f/%.0f"%(N,B, med(lambda: op(x,W,b,None,None,"modrelu"),n), med(lambda: bop(og,ghn,o,W,None,None,"modrelu"),n)))
print(sys.argv[1][-8:], "  ".join(res), flush=True)

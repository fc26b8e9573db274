import time, torch, os, sys
from nnrnn_fused import fused_nnrnn
torch.set_num_threads(2)
T=int(sys.argv[1])
def med(f, n):
    for _ in range(3): f()
    ts=[]
    for _ in range(7):
        s=time.perf_counter()
        for _ in range(n): f()
        ts.append((time.perf_counter()-s)/n/T*1e6)
    return sorted(ts)[3]
for N,B in [(128,10),(128,32),(128,100),(64,10),(64,100)]:
    g=torch.Generator().manual_seed(0)
    x=torch.randn(T,B,N,generator=g).requires_grad_(); W=(torch.linalg.qr(torch.randn(N,N,generator=g))[0]*0.95).contiguous().requires_grad_(); b=(torch.randn(N,generator=g)*0.01).requires_grad_()
    go=torch.randn(T,B,N,generator=g)
    def fb():
        o,_=fused_nnrnn(x,W,b); o.backward(go)
    n=max(2,int(2e6/(N*N*B)*100/T))
    res=[]
    for k in ["packed","blas"]*3:
        os.environ["NNRNN_CPU_KERNEL"]=k
        res.append((k,med(fb,n)))
    p=[v for k,v in res if k=="packed"]; bl=[v for k,v in res if k=="blas"]
    print(N,B,"packed",["%.2f"%v for v in p],"blas",["%.2f"%v for v in bl], "blas/packed %.2f"%(sorted(bl)[1]/sorted(p)[1]), flush=True)

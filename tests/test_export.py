"""Export: torch.export works, with a dynamic sequence length, and round-trips through
save/load; ONNX export and TorchScript are refused with one sentence that names torch.export."""
import importlib.util
import warnings

import pytest
import torch

from nnrnn_fused import NNRNN, fused_nnrnn


def test_torch_export_round_trip(tmp_path):
    layer = NNRNN(3, 4, num_layers=2, bidirectional=True)
    x, lengths = torch.randn(5, 2, 3), torch.tensor([5, 3])
    steps = torch.export.Dim("T", min=2, max=64)
    program = torch.export.export(layer, (x,), {"lengths": lengths}, dynamic_shapes={"input": {0: steps}, "lengths": None})
    torch.export.save(program, tmp_path / "nnrnn.pt2")
    loaded = torch.export.load(tmp_path / "nnrnn.pt2")
    x2 = torch.randn(9, 2, 3)  # another length than at export
    for module in (program.module(), loaded.module()):
        for got, want in zip(module(x2, lengths=lengths), layer(x2, lengths=lengths)):
            torch.testing.assert_close(got, want)


class CallsTheOp(torch.nn.Module):
    def forward(self, x, W):
        return fused_nnrnn(x, W, nonlinearity="tanh")[0]


# torch.onnx.export(dynamo=True), the default, needs onnxscript (in the test extras); dynamo=False does not
EXPORTERS = [False] + ([True] if importlib.util.find_spec("onnxscript") else [])


@pytest.mark.parametrize("dynamo", EXPORTERS, ids=lambda d: "dynamo" if d else "torchscript-based")
@pytest.mark.parametrize("model,args", [(NNRNN(3, 4, bidirectional=True), (torch.randn(5, 2, 3),)),
                                        (CallsTheOp(), (torch.randn(5, 2, 3), torch.randn(3, 3)))],
                         ids=["layer", "op"])
def test_onnx_export_is_refused_with_one_sentence(tmp_path, dynamo, model, args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception, match="ONNX export is not supported .*; export with torch.export.export"):
            torch.onnx.export(model, args, str(tmp_path / "model.onnx"), dynamo=dynamo)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_torchscript_is_refused_with_one_sentence():
    layer = NNRNN(3, 4)
    message = "TorchScript .* is not supported .*; use torch.export.export"
    with pytest.raises(RuntimeError, match=message):
        torch.jit.script(layer)
    with pytest.raises(RuntimeError, match=message):
        torch.jit.script(torch.nn.Sequential(layer, torch.nn.Tanh()))
    with pytest.raises(RuntimeError, match=message):
        torch.jit.trace(layer, (torch.randn(5, 2, 3),))
    layer(torch.randn(5, 2, 3))  # the layer still runs afterwards

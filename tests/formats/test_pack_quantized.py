"""QuantizedWeight <-> pack-quantized tensors and config, as compressed-tensors reads them."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import QuantizationConfig

from compress.errors import CompressError
from compress.formats import pack_quantized
from compress.quant import QuantScheme, rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_tensors_roundtrip_bit_exact(bits, symmetric):
    gen = torch.Generator().manual_seed(bits + 10 * symmetric)
    scheme = QuantScheme(bits, 32, symmetric)
    qw = rtn.quantize(torch.randn(70, 96, generator=gen), scheme)
    tensors = pack_quantized.to_tensors("m", qw)
    back = pack_quantized.from_tensors("m", tensors.__getitem__, tensors.__contains__, scheme)
    assert torch.equal(back.qweight, qw.qweight) and torch.equal(back.scales, qw.scales)
    assert back.shape == (70, 96)
    if symmetric:
        assert "m.weight_zero_point" not in tensors and back.zeros is None
    else:
        zp = tensors["m.weight_zero_point"]
        assert zp.dtype == torch.int32 and zp.shape == (-(-70 * bits // 32), 3)
        assert torch.equal(back.zeros, qw.zeros)
        # compressed-tensors' own unpacker reads our zero points back identically
        assert torch.equal(unpack_from_int32(zp, bits, torch.Size((70, 3)), packed_dim=0),
                           qw.zeros)
    # ... and our codes
    assert torch.equal(unpack_from_int32(tensors["m.weight_packed"], bits,
                                         torch.Size((70, 96))), qw.codes())


def test_config_is_valid_compressed_tensors_and_parses_back():
    schemes = {f"model.layers.{i}.mlp.up_proj": QuantScheme(4, 128, True) for i in range(3)}
    schemes["model.layers.0.mlp.down_proj"] = QuantScheme(8, -1, False)
    config = pack_quantized.quantization_config(schemes, ["lm_head"])
    parsed = QuantizationConfig.model_validate(config)
    assert parsed.format == "pack-quantized" and parsed.ignore == ["lm_head"]
    names = [*schemes, "model.layers.1.mlp.down_proj", "lm_head"]
    back = pack_quantized.parse_quantization_config(config, names)
    # down_proj of layer 1 was not in the map: the class target "Linear" gives it group_0
    assert back.pop("model.layers.1.mlp.down_proj") == QuantScheme(4, 128, True)
    assert back == schemes


def test_corrupt_shapes_are_reported():
    scheme = QuantScheme(4, 32, True)
    tensors = pack_quantized.to_tensors("m", rtn.quantize(torch.randn(8, 64), scheme))
    tensors["m.weight_scale"] = tensors["m.weight_scale"][:, :1]
    with pytest.raises(CompressError, match=r"m.weight_scale .* corrupt"):
        pack_quantized.from_tensors("m", tensors.__getitem__, tensors.__contains__, scheme)


@pytest.mark.parametrize("config,message", [
    ({"quant_method": "gptq"}, "quant_method 'gptq' is not supported"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized"}, "not supported"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {}}}},
     "malformed"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {
        "num_bits": 5, "group_size": 32, "strategy": "group"}}}}, "malformed|not supported"),
])
def test_bad_quantization_config(config, message):
    with pytest.raises(CompressError, match=message):
        pack_quantized.parse_quantization_config(config, ["a"])

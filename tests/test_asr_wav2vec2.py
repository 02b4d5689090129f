"""lacax's wav2vec2 (stable layer norm) against transformers' Wav2Vec2Model, from a local HF directory."""

import json
import os
import tempfile

from absl.testing import absltest
import jax.numpy as jnp
import numpy as np

from lacax.asr import artisan
from lacax.asr import model
from lacax.asr import wav2vec2


def tiny_hf(tmp, layer_norm=True):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = transformers.Wav2Vec2Config(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16, 16),
      conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2), conv_bias=True, feat_extract_norm="layer",
      do_stable_layer_norm=layer_norm, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
  torch.manual_seed(0)
  m = transformers.Wav2Vec2Model(cfg).eval()
  with torch.no_grad():  # non-trivial norms and biases, so a swapped scale/bias would show
    for name, p in m.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(torch.randn_like(p) * 0.1)
  m.save_pretrained(tmp)
  return m


class Wav2Vec2Test(absltest.TestCase):

  def test_hidden_states_match_transformers(self):
    import torch  # pylint: disable=g-import-not-at-top
    tmp = tempfile.mkdtemp()
    hf = tiny_hf(tmp)
    params, cfg = wav2vec2.load(tmp)
    self.assertEqual((cfg.d_model, cfg.num_layers, cfg.frontend), (32, 2, "wav2vec2"))
    x = np.random.default_rng(0).standard_normal((2, 4000)).astype(np.float32)
    with torch.no_grad():
      ref = hf(torch.from_numpy(x)).last_hidden_state.numpy()
    out, mask = model.encode(params, jnp.asarray(x), jnp.ones((2, 4000)), cfg)
    self.assertEqual(out.shape, ref.shape)
    self.assertEqual(int(mask.sum(-1)[0]), ref.shape[1])
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4)
    # The loaded weights wrap into Artisan layers: a no-sparsity mask reproduces the dense hidden states.
    mc = artisan.MaskConfig(kind="artisan", num_languages=2, num_specialists=2, sparsity=0.0)
    params = dict(params, masks=artisan.init_mask_params(__import__("jax").random.PRNGKey(0),
                                                         params["layers"], mc))
    out2, _ = model.encode(params, jnp.asarray(x), jnp.ones((2, 4000)), cfg, mc, 1)
    np.testing.assert_allclose(np.asarray(out2), ref, atol=1e-4)

  def test_refuses_post_ln_layout_and_missing_tensors(self):
    tmp = tempfile.mkdtemp()
    tiny_hf(tmp, layer_norm=False)
    with self.assertRaisesRegex(ValueError, "do_stable_layer_norm=false"):
      wav2vec2.load(tmp)
    tmp2 = tempfile.mkdtemp()
    tiny_hf(tmp2)
    from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
    tensors = load_file(os.path.join(tmp2, "model.safetensors"))
    del tensors["encoder.layers.1.attention.q_proj.weight"]
    save_file(tensors, os.path.join(tmp2, "model.safetensors"))
    with self.assertRaisesRegex(KeyError, "encoder.layers.1.attention.q_proj.weight"):
      wav2vec2.load(tmp2)
    with open(os.path.join(tmp2, "config.json")) as f:
      self.assertTrue(json.load(f)["do_stable_layer_norm"])


if __name__ == "__main__":
  absltest.main()

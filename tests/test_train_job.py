"""The finetune job end to end on a tiny random model with a byte-level chat tokenizer (no downloads).

Full fine-tuning on Alpaca-style records: the held-out answer loss falls, the run directory holds metrics, the
loss curve and the exported parameters, and the same command run again resumes from the run's checkpoints
(nothing left to train) instead of starting over. A changed shape with the same checkpoint directory is refused.
"""

from __future__ import annotations

import json
import os
import tempfile

from absl import flags
from absl.testing import absltest
import jax
import numpy as np
from ml_collections import config_flags
import torch
import transformers

from lacax.jobs import finetune
from lacax.weights import checkpoint as params_ckpt
from tests import train_utils as tu

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse_config(args):
  argv = ["run.py", *args]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  return holder.value


def _tiny_model_dir(width: int = 32) -> str:
  """A random 2-layer Llama (vocab 272) saved with the byte-level tokenizer of tests/train_utils.py."""
  torch.manual_seed(width)
  cfg = transformers.LlamaConfig(vocab_size=272, hidden_size=width, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=True)
  path = os.path.join(tempfile.mkdtemp(prefix="lacax_ft_model_"), "model")
  transformers.LlamaForCausalLM(cfg).save_pretrained(path)
  tok = tu.byte_tokenizer()
  tok.backend.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<|im_end|>", "chat_template": tu.CHATML, "add_bos_token": False}, f)
  return path


def _records(path: str, n: int = 48) -> None:
  rng = np.random.RandomState(0)
  with open(path, "w") as f:
    for _ in range(n):
      word = "".join(rng.choice(list("abcd"), 4))
      f.write(json.dumps({"instruction": "Repeat the word.", "input": word, "output": word}) + "\n")


class FinetuneJobTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model_dir = _tiny_model_dir()
    cls.tmp = tempfile.mkdtemp(prefix="lacax_ft_")
    cls.data = os.path.join(cls.tmp, "alpaca.jsonl")
    _records(cls.data)

  def _args(self, results, *extra):
    return [f"--config={os.path.join(_REPO, 'configs', 'finetune.py')}:cpu", "--config.mode=full",
            f"--config.model.path={self.model_dir}", f"--config.data.path={self.data}", "--config.data.seq_len=64",
            "--config.data.batch_size=4", "--config.data.eval_rows=8", "--config.train.steps=24",
            "--config.train.eval_every=12", "--config.train.checkpoint_every=12", "--config.train.progress=False",
            "--config.optimizer.learning_rate=3e-3", f"--config.results_dir={results}", *extra]

  def test_trains_writes_and_resumes(self):
    results = os.path.join(self.tmp, "results")
    config = _parse_config(self._args(results))
    run_dir = tempfile.mkdtemp(dir=self.tmp)
    out = finetune.run(config, run_dir)["figures"]
    self.assertEqual(out["data_kind"], "instruction")
    self.assertIsNone(out["resumed_from_step"])
    self.assertLess(out["eval_loss_after"], 0.7 * out["eval_loss_before"])
    for name in ("metrics.jsonl", "loss_curve.png"):
      self.assertTrue(os.path.exists(os.path.join(run_dir, name)), name)
    restored = params_ckpt.restore_params(out["exported"]["params"])
    self.assertEqual(restored["layers"]["wq"].shape, (2, 32, 4, 8))
    # The same command again: resumes at the final checkpoint, trains nothing, same result.
    run_dir2 = tempfile.mkdtemp(dir=self.tmp)
    again = finetune.run(_parse_config(self._args(results)), run_dir2)["figures"]
    self.assertEqual(again["resumed_from_step"], 24)
    self.assertEqual(again["checkpoint_dir"], out["checkpoint_dir"])
    self.assertAlmostEqual(again["eval_loss_after"], out["eval_loss_after"], places=6)
    restored2 = params_ckpt.restore_params(again["exported"]["params"])
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(restored2)):
      np.testing.assert_array_equal(a, b)
    # The same checkpoint directory with a model of another width: refused, naming the field that changed.
    other = _tiny_model_dir(width=48)
    with self.assertRaisesRegex(ValueError, r"shapes changed .*model\.path: saved '.*', now '.*'"):
      finetune.run(_parse_config(self._args(results, f"--config.model.path={other}",
                                            f"--config.train.checkpoint_dir={out['checkpoint_dir']}")),
                   tempfile.mkdtemp(dir=self.tmp))


if __name__ == "__main__":
  absltest.main()

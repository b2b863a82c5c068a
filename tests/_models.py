"""Tiny random models of real architectures, and their inputs and outputs, shared by the parity tests
(LoRA, IA³, LoHa against PEFT)."""

import torch
import torch.nn as nn
import transformers

VOCAB = 96


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))


def qwen2():  # q/k/v projections carry a bias
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))


def gpt2():  # Conv1D layers (transposed weights) and the token embedding
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                                n_positions=64))


def bert():  # an encoder with a fresh classification head
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_labels=3))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 3 * 3, 10)

    def forward(self, pixel_values):
        h = torch.relu(self.conv2(torch.relu(self.conv1(pixel_values))))
        return self.fc(h.flatten(1))


def inputs(name: str) -> dict:
    """A fixed batch for the model called ``name`` ("convnet" takes images, the rest token ids)."""
    g = torch.Generator().manual_seed(0)
    if name == "convnet":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=g)}
    return {"input_ids": torch.randint(0, VOCAB, (2, 9), generator=g)}


def output(model, batch: dict) -> torch.Tensor:
    """The model's logits (or output tensor) on ``batch``, without grad."""
    with torch.no_grad():
        out = model(**batch)
    return out if isinstance(out, torch.Tensor) else out.logits

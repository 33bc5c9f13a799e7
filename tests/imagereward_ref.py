"""A compact PyTorch reference of ImageReward (``image-reward`` 1.5) for the Flax parity tests.

The package itself cannot be imported here: ``ImageReward/__init__`` pulls CLIP, timm, fairscale and
torchvision, and ``models/BLIP/med.py`` imports ``apply_chunking_to_forward`` etc. from
``transformers.modeling_utils``, which transformers 5 no longer provides. This file re-states, for
inference (dropout off, no caches, no head masks), the math of:

- ``models/BLIP/vit.py`` VisionTransformer (timm PatchEmbed, cls_token, pos_embed, pre-LN blocks with
  fused ``attn.qkv`` + ``attn.proj``, exact-GELU ``mlp.fc1``/``fc2``, LayerNorm eps 1e-6, final ``norm``);
- ``models/BLIP/med.py`` BertModel(add_pooling_layer=False), mode 'multimodal': word + position embeddings
  (no token types) -> LayerNorm; each layer = self-attention with the additive ``(1 - mask) * -10000``
  padding mask, cross-attention to the image embeddings (all-ones encoder mask -> zero bias), post-LN
  residuals, ``intermediate``/``output``;
- ``ImageReward.py`` MLP (five Linears at Sequential indices 0, 2, 4, 6, 7; Dropouts between) and
  ``score_gard``: ``mlp(last_hidden_state[:, 0])``;
- ``blip_pretrain.py`` BLIP_Pretrain's ``vision_proj``/``text_proj`` and med.py's ``position_ids`` buffer,
  so ``state_dict()`` has exactly the keys of the released ``ImageReward.pt``.

Attribute names equal the package's, so ``state_dict()`` keys are the package's keys.
"""
import math

import torch
from torch import nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0):
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        n = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n + 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.pos_embed[:, :x.size(1), :]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


ACT = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


class BertEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.word_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"], padding_idx=c.get("pad_token_id", 0))
        self.position_embeddings = nn.Embedding(c["max_position_embeddings"], c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])
        self.register_buffer("position_ids", torch.arange(c["max_position_embeddings"]).expand((1, -1)))

    def forward(self, input_ids):
        pos = self.position_ids[:, :input_ids.shape[1]]
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(pos))


class BertSelfAttention(nn.Module):
    def __init__(self, c, is_cross):
        super().__init__()
        h, kv = c["hidden_size"], (c["encoder_width"] if is_cross else c["hidden_size"])
        self.heads, self.dh = c["num_attention_heads"], h // c["num_attention_heads"]
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(kv, h), nn.Linear(kv, h)

    def split(self, x):
        return x.view(*x.shape[:-1], self.heads, self.dh).permute(0, 2, 1, 3)

    def forward(self, hidden, mask, encoder_hidden=None):
        src = hidden if encoder_hidden is None else encoder_hidden
        q, k, v = self.split(self.query(hidden)), self.split(self.key(src)), self.split(self.value(src))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dh) + mask
        ctx = torch.matmul(scores.softmax(dim=-1), v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(*ctx.shape[:-2], self.heads * self.dh)


class BertSelfOutput(nn.Module):
    def __init__(self, c, d_in):
        super().__init__()
        self.dense = nn.Linear(d_in, c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, c, is_cross=False):
        super().__init__()
        self.self = BertSelfAttention(c, is_cross)
        self.output = BertSelfOutput(c, c["hidden_size"])

    def forward(self, hidden, mask, encoder_hidden=None):
        return self.output(self.self(hidden, mask, encoder_hidden), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense, self.act = nn.Linear(c["hidden_size"], c["intermediate_size"]), ACT[c["hidden_act"]]

    def forward(self, x):
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = BertAttention(c)
        self.crossattention = BertAttention(c, is_cross=True)
        self.intermediate = BertIntermediate(c)
        self.output = BertSelfOutput(c, c["intermediate_size"])

    def forward(self, x, mask, encoder_hidden, encoder_mask):
        a = self.attention(x, mask)
        a = self.crossattention(a, encoder_mask, encoder_hidden)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(c) for _ in range(c["num_hidden_layers"])])


class BertModel(nn.Module):
    """med.py BertModel(add_pooling_layer=False) forward in mode 'multimodal'; returns last_hidden_state."""

    def __init__(self, c):
        super().__init__()
        self.embeddings = BertEmbeddings(c)
        self.encoder = BertEncoder(c)

    def forward(self, input_ids, attention_mask, encoder_hidden_states):
        ext = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0          # get_extended_attention_mask
        enc_mask = torch.ones(encoder_hidden_states.shape[:2])
        enc_ext = (1.0 - enc_mask[:, None, None, :]) * torch.finfo(torch.float32).min  # invert_attention_mask
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, ext, encoder_hidden_states, enc_ext)
        return x


class BLIP(nn.Module):
    def __init__(self, vision, med):
        super().__init__()
        self.visual_encoder = VisionTransformer(vision["image_size"], vision["patch_size"], vision["width"],
                                                vision["depth"], vision["heads"], vision.get("mlp_ratio", 4.0))
        med = dict(med, encoder_width=vision["width"])   # BLIP_Pretrain: encoder_config.encoder_width = vision_width
        self.text_encoder = BertModel(med)
        self.vision_proj = nn.Linear(vision["width"], 256)
        self.text_proj = nn.Linear(med["hidden_size"], 256)


class MLP(nn.Module):
    def __init__(self, input_size):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


class ImageReward(nn.Module):
    """``ImageReward.ImageReward``: ``score_raw`` is score_gard before the mean/std normalisation."""
    mean, std = 0.16717362830052426, 1.0333394966054072

    def __init__(self, vision: dict, med: dict):
        super().__init__()
        self.blip = BLIP(vision, med)
        self.mlp = MLP(med["hidden_size"])

    def text_hidden(self, input_ids, attention_mask, image):
        return self.blip.text_encoder(input_ids, attention_mask, self.blip.visual_encoder(image))

    def score_raw(self, input_ids, attention_mask, image):
        return self.mlp(self.text_hidden(input_ids, attention_mask, image)[:, 0, :].float())[:, 0]

    def score_gard(self, input_ids, attention_mask, image):
        return (self.score_raw(input_ids, attention_mask, image)[:, None] - self.mean) / self.std

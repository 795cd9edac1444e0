"""Paper scale with REPA-E: SimFlow + representation alignment to a frozen DINOv2 ViT-B/14.

  python scripts/convert_dinov2.py --input dinov2_vitb14_pretrain.pth --output gs://BUCKET/dinov2_b14.msgpack
  python main.py --config=configs/imagenet256_repae.py --workdir=gs://BUCKET/runs/simflow_repae \
      --config.data.path=gs://BUCKET/tfds --config.repa.weights=gs://BUCKET/dinov2_b14.msgpack

Expected (paper): gFID 1.91. The aligned layer ("Align3": layer 3 of the deep block) and the
weights (REPA-E: 0.5 towards the flow/projector, 1.5 towards the VAE) are OPEN in the paper.
"""
from configs import imagenet256


def get_config(arg: str = ""):
  c = imagenet256.get_config(arg)
  c.repa.enabled = True
  c.repa.encoder = "dinov2_b14"
  c.repa.block, c.repa.layer = -1, 3
  c.repa.proj_hidden = 2048
  c.repa.w_flow, c.repa.w_vae = 0.5, 1.5
  c.repa.interpolate_offset = 0.1
  return c

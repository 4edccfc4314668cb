"""UNet configs ComfyUI's model detection gives SD1.5 and SDXL checkpoints, full size and toy size (--tiny), shared
by the benchmarks. Functions, so every caller gets its own dict."""

_SD15 = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
             adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
             transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
             use_linear_in_transformer=False, context_dim=768, num_heads=8, num_head_channels=-1,
             transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_resblock=False,
             use_temporal_attention=False)
_SDXL = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
             num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320,
             num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
             transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
             transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_attention=False,
             use_temporal_resblock=False)


def sd15(tiny: bool = False) -> dict:
    cfg = dict(_SD15)
    if tiny:
        cfg.update(model_channels=32, channel_mult=[1, 2], num_res_blocks=[1, 1], transformer_depth=[1, 1],
                   transformer_depth_output=[1, 1, 1, 1], num_heads=2)
    return cfg


def sdxl(tiny: bool = False) -> dict:
    cfg = dict(_SDXL)
    if tiny:
        cfg.update(model_channels=32, num_res_blocks=[1, 1], transformer_depth=[0, 1], channel_mult=[1, 2],
                   transformer_depth_middle=1, num_head_channels=16, transformer_depth_output=[0, 0, 1, 1])
    return cfg

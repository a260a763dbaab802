"""Sampling: noise schedules, samplers (pure functions over a denoiser) and denoiser wrappers."""
from .denoisers import (CFGDenoiser, EpsDenoiser, VDenoiser, img2img_steps, sample,
                        sigmas_for_img2img)
from .samplers import (SAMPLERS, BrownianTreeNoiseSampler, NoiseSampler, SamplerSpec,
                       resolve_sampler)
from .schedules import (LABELS, SCHEDULERS, DiscreteSchedule, get_sigmas, scheduler_key,
                        scheduler_label)

__all__ = ["CFGDenoiser", "EpsDenoiser", "VDenoiser", "img2img_steps", "sample",
           "sigmas_for_img2img", "SAMPLERS", "BrownianTreeNoiseSampler", "NoiseSampler",
           "SamplerSpec", "resolve_sampler", "LABELS", "SCHEDULERS", "DiscreteSchedule",
           "get_sigmas", "scheduler_key", "scheduler_label"]

"""Sampling: noise schedules, samplers (pure functions over a denoiser) and denoiser wrappers."""
from .denoisers import (CFGDenoiser, EpsDenoiser, VDenoiser, img2img_steps, sample,
                        sampling_sigmas)
from .noise import BrownianTreeNoiseSampler, NoiseSampler
from .samplers import SAMPLERS, SamplerSpec, resolve_sampler
from .schedules import (LABELS, SCHEDULERS, DiscreteSchedule, get_sigmas, scheduler_key,
                        scheduler_label)

__all__ = ["CFGDenoiser", "EpsDenoiser", "VDenoiser", "img2img_steps", "sample",
           "sampling_sigmas", "SAMPLERS", "BrownianTreeNoiseSampler", "NoiseSampler",
           "SamplerSpec", "resolve_sampler", "LABELS", "SCHEDULERS", "DiscreteSchedule",
           "get_sigmas", "scheduler_key", "scheduler_label"]

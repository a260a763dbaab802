"""Live-preview factors fitted for a VAE sdloom trains (training.train.fit_latent_rgb), stored
in the model config (vae.latent_rgb) and used by the family's preview_factors."""
import dataclasses

import torch
import torch.nn.functional as F

from sdloom.families import family_of
from sdloom.families.sd_detect import config_problems
from sdloom.server.jobs import approx_preview
from sdloom.training.train import fit_latent_rgb
from tiny import TINY_SD1, tiny_model


class LinearVAE:
    """A 'VAE' whose latent is a known affine map of the 4×4 mean colours: z = W·rgb + c."""
    W = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -1.0], [0.3, 0.0, 2.0], [1.0, 1.0, 1.0]])
    c = torch.tensor([0.1, -0.2, 0.3, 0.0])

    def latent_from_image(self, x):
        rgb = F.avg_pool2d(x, 4)
        return torch.einsum("cr,brhw->bchw", self.W, rgb) + self.c.view(1, 4, 1, 1)


def test_fit_inverts_a_known_affine_latent():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 16, 16, generator=g) * 2 - 1 for _ in range(5)]
    m = torch.tensor(fit_latent_rgb(LinearVAE(), images, torch.device("cpu"))).view(5, 3)
    # least squares over an exact affine relation: rgb = Mᵀ z + b reproduces every cell
    x = images[0][None]
    z = LinearVAE().latent_from_image(x)
    pred = torch.einsum("bchw,cr->brhw", z, m[:4]) + m[4].view(1, 3, 1, 1)
    assert torch.allclose(pred, F.avg_pool2d(x, 4), atol=1e-4)


def test_fitted_factors_drive_the_preview_and_are_checked():
    cfg = TINY_SD1
    assert family_of(cfg).preview_factors(dataclasses.replace(cfg, name="embedded")) is None
    rgb = tuple(float(i) for i in range(15))
    fitted = cfg.replace(vae=dataclasses.replace(cfg.vae, latent_rgb=rgb))
    m, bias = family_of(fitted).preview_factors(fitted)
    assert m.shape == (4, 3) and bias.tolist() == [12.0, 13.0, 14.0]
    img = approx_preview(torch.zeros(1, 4, 2, 2), (m, bias * 0 - 1))
    assert img.getpixel((0, 0)) == (0, 0, 0)  # bias −1 everywhere → black
    shapes = {k: tuple(v.shape) for k, v in tiny_model().state_dict().items()}
    assert config_problems(fitted, shapes) == []
    bad = cfg.replace(vae=dataclasses.replace(cfg.vae, latent_rgb=rgb[:14]))
    assert any("latent_rgb" in p for p in config_problems(bad, shapes))


def test_the_embedded_model_has_fitted_factors():
    from sdloom.checkpoints.load import load_model
    from sdloom.pipelines.engine import EMBEDDED_MODEL
    cfg = load_model(EMBEDDED_MODEL, dtype=torch.float32, device=torch.device("cpu")).model.config
    m, bias = family_of(cfg).preview_factors(cfg)
    assert m.shape == (4, 3) and bias is not None and torch.isfinite(m).all()

"""Named constants of DiT and DyDiT (docs/METHOD.md §1, §3, §4, §5).

Every magic number of the method lives here, with the section that defines it.
"""

# §1.1: Stable Diffusion VAE latents are scaled by this factor before diffusion.
LATENT_SCALE = 0.18215

# §1.2: sinusoidal timestep features fed to the t-embedder MLP.
TIMESTEP_FREQ_DIM = 256
# §1.2: LayerNorm epsilon used throughout DiT (non-affine norms).
LAYERNORM_EPS = 1e-6

# §1.2 / §1.3: class dropout probability during training; the null class index equals num_classes.
CLASS_DROPOUT_PROB = 0.1

# §1.3: DiT's reference classifier-free guidance guides only the first three output channels.
DIT_COMPAT_GUIDANCE_CHANNELS = 3

# §1.4: diffusion length and linear beta schedule endpoints (scaled by 1000 / T).
NUM_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02
# §16.2: Stable Diffusion's "scaled linear" betas (linear in sqrt(beta)), which U-ViT's H models use.
SD_BETA_START = 0.00085
SD_BETA_END = 0.012

# §3.1: width-router bias at initialisation; sigmoid(15) ~ 1, so a fresh DyDiT keeps every head/group.
WIDTH_ROUTER_INIT_BIAS = 15.0
# §4.1: last bias of the token router at initialisation; every token is kept at first.
TOKEN_ROUTER_INIT_BIAS = 35.0
# §4.1: hidden width of the token router is D // TOKEN_ROUTER_REDUCTION.
TOKEN_ROUTER_REDUCTION = 16
# §3.2: Gumbel-sigmoid temperature during training (no annealing in the reference code).
GUMBEL_TAU = 5.0

# §5.3: weight of the FLOPs-ratio loss w * (rho - lambda_t)^2.
FLOPS_LOSS_WEIGHT = 2.0
# §5.4: the target stays at 1.0 for this many iterations before decaying to lambda.
TARGET_HOLD_STEPS = 100
# §5.4: lambda_t reaches the target at this iteration (the reference code's default warm-up).
TARGET_WARMUP_STEPS = 1000
# Runs shorter than TARGET_WARMUP_STEPS / AUTO_WARMUP_FRACTION scale the schedule to their length
# (hold 1/20 of the run, warm-up to the target by mid-run), so a short fine-tune reaches lambda.
AUTO_HOLD_FRACTION = 0.05
AUTO_WARMUP_FRACTION = 0.5
# §5.3: number of timestep strata of the stratified sampler.
TIMESTEP_STRATA = 4

# §18 (ours): TD-LoRA group-router bias at initialisation; sigmoid(3) ~ 0.95, so nearly every adapter
# group is on at first while the Gumbel noise still explores (and the gradient is not saturated).
LORA_ROUTER_INIT_BIAS = 3.0

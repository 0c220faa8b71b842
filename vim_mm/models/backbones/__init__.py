from .vision_mamba import ARCH_SETTINGS, VisionMamba

__all__ = ['ARCH_SETTINGS', 'VisionMamba']

"""PH-Reg itself: test-time-augmentation denoising, targets, distillation, the student."""

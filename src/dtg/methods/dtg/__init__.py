"""DTG-SSOD (Dense Teacher Guidance), ``method=dtg`` (docs/method.md): clusters (NMS clusters),
correspondence (teacher samples -> student samples), targets (INC targets of both stages, pure),
image_targets (one image's targets with the stage's config), losses (INC losses and Rank Matching),
method (:class:`DTGMethod`)."""

from dtg.methods.dtg.method import DTGMethod, DTGTargets, TeacherPass, teacher_pass

__all__ = ["DTGMethod", "DTGTargets", "TeacherPass", "teacher_pass"]

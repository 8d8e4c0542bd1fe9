"""DTG-SSOD (Dense Teacher Guidance), ``method=dtg``, in the order the paper tells it (docs/method.md).

* :mod:`~dtg.methods.dtg.clusters`: NMS clusters, the "inverse NMS clustering": greedy NMS over the
  teacher's candidates and, for each suppressed one, the kept box that suppressed it.
* :mod:`~dtg.methods.dtg.correspondence`: teacher samples -> student samples: proposals mapped one to one
  into the strong view (R-CNN), teacher anchors paired with student anchors (RPN).
* :mod:`~dtg.methods.dtg.targets`: INC targets of both stages (:class:`~dtg.methods.dtg.targets.IncTargets`),
  pure; :mod:`~dtg.methods.dtg.image_targets`: one image's targets as training builds them with the
  stage's config, and operations on a batch's targets.
* :mod:`~dtg.methods.dtg.losses`: the INC losses and Rank Matching.
* :mod:`~dtg.methods.dtg.teacher`: the teacher's pass and the typed targets of a batch;
  :mod:`~dtg.methods.dtg.stages`: the R-CNN stage, the RPN stage and the sparse-RPN hybrid, one object each;
  :mod:`~dtg.methods.dtg.method`: :class:`DTGMethod`, which runs the stages and weighs their loss terms
  with one weight dict.
"""

from dtg.methods.dtg.method import DTGMethod, weight_dict
from dtg.methods.dtg.teacher import DTGTargets, TeacherPass, teacher_pass

__all__ = ["DTGMethod", "DTGTargets", "TeacherPass", "teacher_pass", "weight_dict"]

"""Command line: ``python -m inference_course {doctor,model,course,notebooks,grade,profile}``."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference_course", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="quick check of hardware, versions, vLLM, FastAPI and Triton")
    doctor.add_argument("--skip", default="", help="comma-separated steps to skip (e.g. vllm,triton)")
    sub.add_parser("model", help="fetch and convert the embedded model (or check COURSE_MODEL); print its path")
    course = sub.add_parser("course", help="execute every solution notebook and write the results report")
    course.add_argument("--out", default="course-results")
    course.add_argument("--only", default=None, help="only notebooks whose path contains this text")
    course.add_argument("--inplace", action="store_true",
                        help="also write the executed outputs back into the solution notebooks")
    notebooks = sub.add_parser("notebooks", help="regenerate the learner notebooks from the solutions")
    notebooks.add_argument("--check", action="store_true", help="only report stale learner notebooks")
    grade = sub.add_parser("grade", help="run a learner notebook and report each exercise: passed, failed, "
                                         "not attempted")
    grade.add_argument("notebook", nargs="+", help="learner notebook(s), e.g. 02-Labs/.../01-KV_Cache.ipynb")
    grade.add_argument("--timeout", type=int, default=None, help="seconds per cell (default: the profile's)")
    sub.add_parser("profile", help="print the active profile and the machine as JSON")
    args = parser.parse_args(argv)

    if args.command == "doctor":
        from .doctor import FAIL, run

        results = run(skip=tuple(s.strip() for s in args.skip.split(",") if s.strip()))
        return 1 if any(r.verdict == FAIL for r in results) else 0
    if args.command == "model":
        from .models import model_label, resolve_model

        model = resolve_model()
        print(f"{model_label(model)}: {model}")
        return 0
    if args.command == "course":
        from .notebooks import run_course

        report, runs = run_course(args.out, only=args.only, inplace=args.inplace)
        print(f"report: {report}")
        return 1 if any(r.error for r in runs) else 0
    if args.command == "notebooks":
        from .notebooks import check_learners, generate_learners

        if args.check:
            problems = check_learners()
            print("\n".join(problems) or "learner notebooks are up to date")
            return 1 if problems else 0
        for path in generate_learners():
            print(f"wrote {path}")
        return 0
    if args.command == "grade":
        from .grading import PASSED, GradingError, grade, report

        ok = True
        for notebook in args.notebook:
            try:
                outcome = grade(notebook, args.timeout)
            except (GradingError, FileNotFoundError) as exc:
                print(f"{notebook}: {exc}", file=sys.stderr)
                ok = False
                continue
            print(report(notebook, outcome), flush=True)
            ok = ok and all(r.status == PASSED for r in outcome if r.status != "not checked")
        return 0 if ok else 1
    if args.command == "profile":
        from .profiles import get_profile, system_info

        profile = get_profile()
        print(json.dumps({"profile": profile.as_dict(), "system": system_info(profile)}, indent=2))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())

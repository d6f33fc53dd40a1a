"""`hived doctor`, `hived image`, `hived repo`, `hived bench`: this host and its caches."""

import json


def cmd_doctor(args) -> int:
    from hived import doctor
    from hived.errors import EXIT_FAILED, EXIT_OK

    report = doctor.run_checks()
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(doctor.render(report))
    return EXIT_OK if report["ok"] else EXIT_FAILED


def cmd_image(args, rest) -> int:
    from hived.cli import image

    return image.main(rest)


def cmd_repo(args, rest) -> int:
    from hived.cli import repo

    return repo.main(rest)


def cmd_bench(args, rest) -> int:
    from hived import bench

    return bench.main(rest)


def add_parsers(sub) -> None:
    d = sub.add_parser("doctor", help="check this host for what hived needs")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(handler=cmd_doctor)

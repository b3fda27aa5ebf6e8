# NixOS module: services.ringlet runs `ringlet node` as a systemd service.
#
#   services.ringlet = { enable = true; accelerator = "ipex"; openFirewall = true; };
#
# State and models live in /var/lib/ringlet (RINGLET_HOME). openFirewall opens the API and
# dashboard (apiPort, 52415 by default; served to the LAN only with host = "0.0.0.0"), zenoh (52414,
# tcp and udp) and zenoh's multicast scouting (udp 7446, group 224.0.0.224), which is how nodes on
# one LAN find each other.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:

let
  cfg = config.services.ringlet;
  zenohPort = 52414;
  zenohScoutingPort = 7446;
  stateDirectory = "/var/lib/ringlet";
in
{
  options.services.ringlet = {
    enable = lib.mkEnableOption "ringlet node, which pools this machine's accelerators into a ringlet LLM cluster";

    accelerator = lib.mkOption {
      type = lib.types.enum [
        "cpu"
        "cuda"
        "ipex"
      ];
      default = "cpu";
      description = ''
        Which build of ringlet to run: "cpu", "cuda" (NVIDIA; needs nixpkgs.config.allowUnfree and
        hardware.nvidia) or "ipex" (Intel Arc / Data Center GPU Max; also installs the Intel compute
        and media drivers through hardware.graphics).
      '';
    };

    package = lib.mkOption {
      type = lib.types.package;
      default = import ./package.nix {
        inherit pkgs;
        inherit (cfg) accelerator;
      };
      defaultText = lib.literalExpression ''
        mkRingletPackage { inherit pkgs; accelerator = config.services.ringlet.accelerator; }
      '';
      description = "The ringlet package to run.";
    };

    apiPort = lib.mkOption {
      type = lib.types.port;
      default = 52415;
      description = "Port of the OpenAI-compatible API and the dashboard.";
    };

    host = lib.mkOption {
      type = lib.types.str;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = ''
        Address the API and dashboard serve on. The API has no authentication: the default keeps it
        to this machine; "0.0.0.0" serves the network (with openFirewall, or your own rules).
      '';
    };

    engine = lib.mkOption {
      type = lib.types.nullOr (
        lib.types.enum [
          "cpu"
          "cuda"
          "ipex"
        ]
      );
      default = null;
      description = "Pin the engine (RINGLET_ENGINE); null picks the best one available.";
    };

    extraArgs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [
        "--connect"
        "tcp/192.168.1.20:52414"
      ];
      description = "More arguments for `ringlet node`.";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Open the API port (tcp), zenoh's port 52414 (tcp and udp) and udp 7446 for zenoh's multicast
        scouting (224.0.0.224), so that other nodes and clients on the network reach this one. Clients
        reach the API only when `host` is not a loopback address.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    hardware.graphics = lib.mkIf (cfg.accelerator == "ipex") {
      enable = true;
      extraPackages = [
        pkgs.intel-compute-runtime
        pkgs.intel-media-driver
      ];
    };

    networking.firewall = lib.mkIf cfg.openFirewall {
      allowedTCPPorts = [
        zenohPort
        cfg.apiPort
      ];
      allowedUDPPorts = [
        zenohPort
        zenohScoutingPort
      ];
    };

    systemd.services.ringlet = {
      description = "ringlet node: pools this machine's accelerators into a ringlet LLM cluster";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];

      environment = {
        RINGLET_HOME = stateDirectory;
        # libraries that cache under ~ write into the state directory too
        HOME = stateDirectory;
        XDG_CACHE_HOME = "/var/cache/ringlet";
        PYTHONUNBUFFERED = "1";
      }
      // lib.optionalAttrs (cfg.engine != null) { RINGLET_ENGINE = cfg.engine; };

      serviceConfig = {
        Type = "exec";
        ExecStart = utils.escapeSystemdExecArgs (
          [
            (lib.getExe cfg.package)
            "node"
            "--api-port"
            (toString cfg.apiPort)
            "--host"
            cfg.host
          ]
          ++ cfg.extraArgs
        );
        DynamicUser = true;
        StateDirectory = "ringlet";
        CacheDirectory = "ringlet";
        WorkingDirectory = stateDirectory;
        # Intel GPUs: /dev/dri/renderD* belongs to group render, /dev/dri/card* to video
        SupplementaryGroups = [
          "render"
          "video"
        ];
        Restart = "on-failure";
        RestartSec = 5;
        # SIGTERM to the node only: it stops its runner processes and leaves the cluster itself
        KillMode = "mixed";
        TimeoutStopSec = 30;

        # The same hardening as packaging/systemd/ringlet.service; it leaves GPUs and JIT compilers
        # working (no PrivateDevices, ProtectClock, MemoryDenyWriteExecute or SystemCallFilter).
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectHostname = true;
        RestrictSUIDSGID = true;
        RestrictRealtime = true;
        RestrictNamespaces = true;
        LockPersonality = true;
        SystemCallArchitectures = "native";
        RestrictAddressFamilies = [
          "AF_UNIX"
          "AF_INET"
          "AF_INET6"
          "AF_NETLINK"
        ];
        CapabilityBoundingSet = "";
        UMask = "0077";
      };
    };
  };
}

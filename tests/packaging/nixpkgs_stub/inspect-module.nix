# Evaluates nix/module.nix with the nixpkgs stand-in for one services.ringlet setting (`settings`,
# merged over the option defaults) and returns the option defaults and the resulting NixOS config.
{
  settings ? { },
}:
let
  pkgs = import ./. { };
  inherit (pkgs) lib;
  utils.escapeSystemdExecArgs = args: builtins.concatStringsSep " " args;
  module = import ../../../nix/module.nix;
  options = (module {
    inherit lib pkgs utils;
    config.services.ringlet = throw "options must not depend on the configuration";
  }).options.services.ringlet;
  defaults = builtins.mapAttrs (name: option: option.default) (removeAttrs options [ "package" ]);
  cfg =
    defaults
    // settings
    // {
      package = import ../../../nix/package.nix {
        inherit pkgs;
        accelerator = settings.accelerator or defaults.accelerator;
      };
    };
in
{
  inherit defaults;
  config =
    (module {
      inherit lib pkgs utils;
      config.services.ringlet = cfg;
    }).config;
}

# What a NixOS configuration needs to boot as a stoker image.
#
# stoker's nixos builder (src/stoker/images/nixos.py) adds this module to the
# configuration named in a spec's `base = "nixos:FLAKEREF#ATTR"`:
#
#   (import ./stoker-agent.nix { agentSrc = <directory holding the `stoker` package>; })
#
# Boot contract, shared with the host:
#   /dev/vda   erofs image whose root is the system closure (<hash>-name entries at the
#              top, as microvm.nix builds its store disk), mounted read-only on /nix/store
#   /dev/vdb   ext4 disk formatted by the host for every VM: the writable root file system
#   console    ttyS0
#   agent      virtio-serial port org.stoker.agent, served by the stoker-agent unit below
#
# The host boots stoker's kernel with stoker's busybox initramfs as stage 1: it
# mounts the two disks as above and runs <toplevel>/init (stoker.init=), so
# NixOS's stage 2 starts with / and /nix/store in place and /dev, /proc, /sys
# mounted.  The settings below for stage 1 (initrd modules, fileSystems) serve
# the configuration's own kernel and initrd, recorded in the image's manifest
# and booted with init= and regInfo= where a host does that instead.
{ agentSrc }:
{ config, lib, pkgs, ... }:
let
  cfg = config.stoker.agent;
  # systemd's unit for the udev symlink /dev/virtio-ports/org.stoker.agent
  # ("-" in a path component is escaped as \x2d in unit names).
  portUnit = "dev-virtio\\x2dports-org.stoker.agent.device";
in
{
  options.stoker.agent = {
    python = lib.mkOption {
      type = lib.types.package;
      default = pkgs.python3;
      defaultText = lib.literalExpression "pkgs.python3";
      description = "Python 3.9 or later that runs the stoker guest agent (standard library only).";
    };
    src = lib.mkOption {
      type = lib.types.path;
      default = agentSrc;
      readOnly = true;
      description = "Directory with the agent's `stoker` package; put on PYTHONPATH.";
    };
  };

  config = {
    # The host loads kernel and initrd itself; there is no boot loader to install.
    boot.loader.grub.enable = lib.mkDefault false;

    # -M microvm has only virtio-mmio devices.  Loaded explicitly in stage 1: the
    # store and root disks are needed before udev would get around to them.
    boot.initrd.availableKernelModules = [ "virtio_mmio" "virtio_blk" "erofs" "ext4" ];
    boot.initrd.kernelModules = [ "virtio_mmio" "virtio_blk" "erofs" ];
    # The agent's port (virtio_console) and the entropy source (virtio_rng) come later.
    boot.kernelModules = [ "virtio_console" "virtio_rng" ];

    fileSystems."/" = lib.mkDefault {
      device = "/dev/vdb";
      fsType = "ext4";
      options = [ "noatime" ];
      # Freshly formatted by the host for this VM; nothing to check.
      noCheck = true;
      neededForBoot = true;
    };
    # Read-only and complete: no overlay, so nothing in the guest can change it.
    fileSystems."/nix/store" = {
      device = "/dev/vda";
      fsType = "erofs";
      options = [ "ro" "x-systemd.after=systemd-modules-load.service" ];
      neededForBoot = true;
    };

    # A read-only store has no use for the daemon (it could not add paths).
    systemd.services.nix-daemon.enable = lib.mkDefault false;
    systemd.sockets.nix-daemon.enable = lib.mkDefault false;
    # Tell the Nix database what the store disk holds, so `nix-store -q` and
    # friends work in the guest.  Only when Nix is in the configuration at all.
    boot.postBootCommands = lib.mkIf config.nix.enable ''
      for arg in $(cat /proc/cmdline); do
        case "$arg" in
          regInfo=*) ${config.nix.package.out}/bin/nix-store --load-db < "''${arg#regInfo=}" ;;
        esac
      done
    '';

    # A throw-away VM with no one at the console: a failed mount must not wait
    # for a root password; the host notices the missing agent and reports the console.
    systemd.enableEmergencyMode = lib.mkDefault false;
    # No network device is attached.
    networking.useDHCP = lib.mkDefault false;

    # Start the agent as soon as its port appears (and make sure systemd tracks it).
    services.udev.extraRules = ''
      SUBSYSTEM=="virtio-ports", ATTR{name}=="org.stoker.agent", TAG+="systemd", ENV{SYSTEMD_WANTS}+="stoker-agent.service"
    '';

    systemd.services.stoker-agent = {
      description = "stoker guest agent";
      wantedBy = [ "multi-user.target" ];
      bindsTo = [ portUnit ];
      after = [ portUnit ];
      # As PID 1 the agent powers the VM off when it ends (after a shutdown
      # request, or a fatal error); as a service it only exits, so systemd does it.
      unitConfig = {
        SuccessAction = "poweroff-force";
        FailureAction = "poweroff-force";
      };
      environment.PYTHONPATH = "${cfg.src}";
      # The agent gives every command its complete environment; restarts after
      # a configuration switch make no sense in a throw-away VM.
      restartIfChanged = false;
      serviceConfig = {
        ExecStart = "${cfg.python}/bin/python3 -B -S -m stoker.agent";
        WorkingDirectory = "/";
        # Its complaints must reach the host, which reads only the serial console.
        StandardOutput = "journal+console";
        StandardError = "journal+console";
        Restart = "no";
        # Builds fork a lot; systemd's default cap (15% of pid_max) is for desktops.
        TasksMax = "infinity";
      };
    };
  };
}

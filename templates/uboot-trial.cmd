# Written by btrfs-deploy: U-Boot's distro boot runs this script (/boot.scr
# on the boot partition) when it finds no /extlinux/extlinux.conf there.
# One-shot trial: when /btrfs-deploy/trial-once exists, it is deleted
# first (so the trial happens once, whatever follows) and the menu of
# /btrfs-deploy/trial.conf, whose default is the version on trial, boots.
# Otherwise, or when the mark cannot be deleted, the normal menu
# /boot/extlinux/extlinux.conf boots the default. If this script fails,
# distro boot goes on to /boot/extlinux/extlinux.conf by itself.
if test -e ${devtype} ${devnum}:${distro_bootpart} /btrfs-deploy/trial-once; then
  fatrm ${devtype} ${devnum}:${distro_bootpart} /btrfs-deploy/trial-once
  if test -e ${devtype} ${devnum}:${distro_bootpart} /btrfs-deploy/trial-once; then
    echo "btrfs-deploy: cannot clear the trial mark: booting the default"
  else
    echo "btrfs-deploy: trial boot (one-shot)"
    sysboot ${devtype} ${devnum}:${distro_bootpart} any ${scriptaddr} /btrfs-deploy/trial.conf
    echo "btrfs-deploy: the trial menu did not boot: booting the default"
  fi
fi
sysboot ${devtype} ${devnum}:${distro_bootpart} any ${scriptaddr} /boot/extlinux/extlinux.conf

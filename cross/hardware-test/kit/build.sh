#!/bin/sh
# Runs in a chroot of the emulated Pi's rootfs (cross/vm.sh vm_kit), with that kernel's headers:
# builds the kernel's own gpio-sim as a module, and the i2c-sim CUSE server.
set -e
kver=$1
if grep -q '^CONFIG_IRQ_SIM=y' "/boot/config-$kver"; then
  echo 'obj-m := gpio-sim.o' >Kbuild
else
  # gpio-sim's interrupt simulator is not built into this kernel either: link it in. It calls
  # irq_to_desc(), which modules cannot: generic_handle_irq() runs the same handler
  # (handle_simple_irq, set when the interrupt is mapped) through an exported function.
  sed -i 's/handle_simple_irq(irq_to_desc(\([a-z_]*\)))/generic_handle_irq(\1)/' irq_sim.c
  if grep -q irq_to_desc irq_sim.c; then echo "build.sh: irq_sim.c still calls irq_to_desc" >&2; exit 1; fi
  mv gpio-sim.c gpio-sim-main.c
  printf 'obj-m := gpio-sim.o\ngpio-sim-y := gpio-sim-main.o irq_sim.o\n' >Kbuild
fi
make -C "/lib/modules/$kver/build" M="$PWD" modules
# shellcheck disable=SC2046
gcc -O2 -Wall -Werror -o i2c-sim i2c-sim.c $(pkg-config --cflags --libs fuse3)

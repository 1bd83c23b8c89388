/*
 * i2c-sim: an I2C bus with emulated chips, served from user space as a character device (CUSE)
 * that speaks the kernel's i2c-dev interface: plain read() and write() after I2C_SLAVE, I2C_FUNCS,
 * I2C_RDWR and I2C_SMBUS. It stands in for /dev/i2c-1 on the hardware test's emulated Pi
 * (cross/hardware-test.sh), so the firmware's own I2C code (rppal) runs unchanged.
 *
 * The chips are modelled from their datasheets, not from nightlight's drivers:
 *  - Grove Base Hat (Seeed, STM32 firmware at 0x04 or MM32 at 0x08; grove_rpi_base_hat.ino):
 *    a register pointer written as one byte, then 16-bit words read low byte first: 0x00 product
 *    id 0x0004, 0x01 firmware version, 0x10+ch raw 12-bit reading, 0x20+ch input in mV, 0x30+ch
 *    input over supply in 0.1 % (the supply is 3300 mV).
 *  - TI ADS1115 (SBAS444, 9.5-9.6): pointer register (0 conversion, 1 config, 2 Lo_thresh,
 *    3 Hi_thresh), 16-bit registers MSB first; config resets to 0x8583; a single-shot conversion
 *    starts when OS is written 1 in power-down mode, OS reads 0 while converting (1/DR seconds),
 *    then 1; the result is the input over the PGA's full scale times 32768, saturated.
 *  - ROHM BH1750FVI (datasheet 2011.11, p. 5-11): opcodes power down 0x00, power on 0x01, reset
 *    0x07, continuous H/H2/L 0x10/0x11/0x13, one-time H/H2/L 0x20/0x21/0x23, MTreg 0x40-0x47
 *    and 0x60-0x7F; a read returns the data register, high byte first; a measurement takes 120 ms
 *    (H, H2) or 16 ms (L) at MTreg 69, and counts lux * 1.2 * MTreg / 69 (twice that in H2).
 *
 * Usage: i2c-sim DEVNAME DIR CHIP... [-- FUSE options]; CHIP is grove@0x04, grove@0x08,
 * ads1115@0x48 or bh1750@0x23. What the chips measure is read from DIR at every conversion:
 * DIR/millivolts (the light sensor's output voltage on A0 / AIN0) and DIR/lux.
 */
#define FUSE_USE_VERSION 31
#include <cuse_lowlevel.h>
#include <errno.h>
#include <linux/i2c-dev.h>
#include <linux/i2c.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>

enum kind { GROVE, ADS1115, BH1750 };

struct chip {
	enum kind kind;
	uint8_t addr;
	uint8_t pointer;          /* Grove, ADS1115: the register pointer */
	uint16_t config;          /* ADS1115 */
	uint16_t lo, hi;          /* ADS1115 thresholds */
	int16_t conversion;       /* ADS1115 */
	double done_at;           /* ADS1115 and BH1750: when the running conversion ends (0: none) */
	int powered;              /* BH1750 */
	uint8_t mode;             /* BH1750: the measurement opcode running, 0 for none */
	uint8_t mtreg;            /* BH1750 */
	uint16_t data;            /* BH1750: the data register */
};

#define MAX_CHIPS 8
static struct chip chips[MAX_CHIPS];
static int nchips;
static const char *dir;

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double input(const char *name)
{
	char path[512];
	double v = 0;
	snprintf(path, sizeof path, "%s/%s", dir, name);
	FILE *f = fopen(path, "r");
	if (f) {
		if (fscanf(f, "%lf", &v) != 1)
			v = 0;
		fclose(f);
	}
	return v;
}

static struct chip *find(unsigned addr)
{
	for (int i = 0; i < nchips; i++)
		if (chips[i].addr == addr)
			return &chips[i];
	return NULL;
}

/* --- Grove Base Hat --- */
#define GROVE_SUPPLY_MV 3300.0

static uint16_t grove_register(uint8_t reg)
{
	double mv = reg % 16 == 0 ? input("millivolts") : 0; /* the sensor sits on A0 */
	if (mv < 0)
		mv = 0;
	if (mv > GROVE_SUPPLY_MV)
		mv = GROVE_SUPPLY_MV;
	if (reg == 0x00)
		return 0x0004; /* product id: Grove Base Hat for Raspberry Pi */
	if (reg == 0x01)
		return 0x0002; /* firmware version */
	if (reg >= 0x10 && reg < 0x18)
		return (uint16_t)(mv * 4095.0 / GROVE_SUPPLY_MV + 0.5);
	if (reg >= 0x20 && reg < 0x28)
		return (uint16_t)(mv + 0.5);
	if (reg >= 0x30 && reg < 0x38)
		return (uint16_t)(mv * 1000.0 / GROVE_SUPPLY_MV + 0.5);
	return 0;
}

/* --- ADS1115 --- */
static const double ads_fsr[8] = {6.144, 4.096, 2.048, 1.024, 0.512, 0.256, 0.256, 0.256};
static const double ads_sps[8] = {8, 16, 32, 64, 128, 250, 475, 860};

static int16_t ads_convert(uint16_t config)
{
	double ain[4] = {input("millivolts") / 1000.0, 0, 0, 0};
	unsigned mux = (config >> 12) & 7;
	static const int pos[8] = {0, 0, 1, 2, 0, 1, 2, 3}, neg[8] = {1, 3, 3, 3, -1, -1, -1, -1};
	double v = ain[pos[mux]] - (neg[mux] < 0 ? 0 : ain[neg[mux]]);
	double code = v / ads_fsr[(config >> 9) & 7] * 32768.0;
	if (code > 32767)
		code = 32767;
	if (code < -32768)
		code = -32768;
	return (int16_t)(code < 0 ? code - 0.5 : code + 0.5);
}

static void ads_tick(struct chip *c)
{
	if (c->done_at != 0 && now() >= c->done_at) {
		c->conversion = ads_convert(c->config);
		c->done_at = 0;
		c->config |= 0x8000; /* OS: idle again */
	}
	if (!(c->config & 0x0100)) /* continuous mode: always the latest */
		c->conversion = ads_convert(c->config);
}

static uint16_t ads_register(struct chip *c)
{
	ads_tick(c);
	switch (c->pointer & 3) {
	case 0: return (uint16_t)c->conversion;
	case 1: return c->config;
	case 2: return c->lo;
	default: return c->hi;
	}
}

static void ads_write(struct chip *c, const uint8_t *b, size_t n)
{
	ads_tick(c);
	if (n >= 1)
		c->pointer = b[0] & 3;
	if (n < 3)
		return;
	uint16_t v = (uint16_t)(b[1] << 8 | b[2]);
	if (c->pointer == 1) {
		int start = (v & 0x8000) && (c->config & 0x8000) && (c->config & 0x0100 || v & 0x0100);
		c->config = v & 0x7fff;
		if (start)
			c->done_at = now() + 1.0 / ads_sps[(v >> 5) & 7];
		else if (c->done_at == 0)
			c->config |= 0x8000;
	} else if (c->pointer == 2) {
		c->lo = v;
	} else if (c->pointer == 3) {
		c->hi = v;
	}
}

/* --- BH1750 --- */
static void bh_tick(struct chip *c)
{
	if (c->mode && c->done_at != 0 && now() >= c->done_at) {
		double count = input("lux") * 1.2 * c->mtreg / 69.0;
		if ((c->mode & 0x0f) == 0x01)
			count *= 2; /* H-resolution mode 2: half a lux per count */
		if ((c->mode & 0x0f) == 0x03)
			count = (double)((long)(count / 4) * 4); /* L-resolution: 4 lx steps */
		c->data = count > 65535 ? 65535 : (uint16_t)(count + 0.5);
		if (c->mode & 0x20) { /* one-time: power down after the measurement */
			c->mode = 0;
			c->powered = 0;
			c->done_at = 0;
		} else {
			c->done_at = now() + ((c->mode & 0x0f) == 0x03 ? 0.016 : 0.120) * c->mtreg / 69.0;
		}
	}
}

static void bh_write(struct chip *c, uint8_t op)
{
	bh_tick(c);
	if (op == 0x00) {
		c->powered = 0;
		c->mode = 0;
	} else if (op == 0x01) {
		c->powered = 1;
	} else if (op == 0x07) {
		if (c->powered)
			c->data = 0;
	} else if (op == 0x10 || op == 0x11 || op == 0x13 || op == 0x20 || op == 0x21 || op == 0x23) {
		c->powered = 1;
		c->mode = op;
		c->done_at = now() + ((op & 0x0f) == 0x03 ? 0.016 : 0.120) * c->mtreg / 69.0;
	} else if ((op & 0xf8) == 0x40) {
		c->mtreg = (uint8_t)((c->mtreg & 0x1f) | (op & 7) << 5);
	} else if ((op & 0xe0) == 0x60) {
		c->mtreg = (uint8_t)((c->mtreg & 0xe0) | (op & 0x1f));
	}
}

/* --- one transfer to one address: 0 or -errno --- */
static int xfer_write(unsigned addr, const uint8_t *b, size_t n)
{
	struct chip *c = find(addr);
	if (!c)
		return -EREMOTEIO; /* no ACK: what the Pi's controller (i2c-bcm2835) reports */
	switch (c->kind) {
	case GROVE:
		if (n >= 1)
			c->pointer = b[0];
		break;
	case ADS1115:
		ads_write(c, b, n);
		break;
	case BH1750:
		for (size_t i = 0; i < n; i++)
			bh_write(c, b[i]);
		break;
	}
	return 0;
}

static int xfer_read(unsigned addr, uint8_t *b, size_t n)
{
	struct chip *c = find(addr);
	if (!c)
		return -EREMOTEIO;
	uint16_t w = 0;
	switch (c->kind) {
	case GROVE:
		w = grove_register(c->pointer);
		for (size_t i = 0; i < n; i++)
			b[i] = i % 2 ? w >> 8 : w & 0xff; /* little-endian words */
		return 0;
	case ADS1115:
		w = ads_register(c);
		break;
	case BH1750:
		bh_tick(c);
		w = c->data;
		break;
	}
	for (size_t i = 0; i < n; i++)
		b[i] = i % 2 ? w & 0xff : w >> 8; /* big-endian words */
	return 0;
}

/* --- the i2c-dev interface --- */
struct client {
	unsigned addr;
};

static void sim_open(fuse_req_t req, struct fuse_file_info *fi)
{
	struct client *cl = calloc(1, sizeof *cl);
	if (!cl) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	fi->fh = (uintptr_t)cl;
	fi->direct_io = 1;
	fi->nonseekable = 1;
	fuse_reply_open(req, fi);
}

static void sim_release(fuse_req_t req, struct fuse_file_info *fi)
{
	free((void *)(uintptr_t)fi->fh);
	fuse_reply_err(req, 0);
}

static void sim_read(fuse_req_t req, size_t size, off_t off, struct fuse_file_info *fi)
{
	(void)off;
	uint8_t buf[8192];
	struct client *cl = (void *)(uintptr_t)fi->fh;
	if (size > sizeof buf) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	int r = xfer_read(cl->addr, buf, size);
	if (r < 0)
		fuse_reply_err(req, -r);
	else
		fuse_reply_buf(req, (const char *)buf, size);
}

static void sim_write(fuse_req_t req, const char *buf, size_t size, off_t off, struct fuse_file_info *fi)
{
	(void)off;
	struct client *cl = (void *)(uintptr_t)fi->fh;
	if (size > 8192) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	int r = xfer_write(cl->addr, (const uint8_t *)buf, size);
	if (r < 0)
		fuse_reply_err(req, -r);
	else
		fuse_reply_write(req, size);
}

static void rdwr(fuse_req_t req, void *arg, const void *in, size_t in_size, size_t out_size)
{
	struct i2c_rdwr_ioctl_data hdr;
	struct iovec iv_in[2 + I2C_RDWR_IOCTL_MAX_MSGS], iv_out[I2C_RDWR_IOCTL_MAX_MSGS];
	if (in_size < sizeof hdr) { /* stage 1: fetch the header */
		iv_in[0] = (struct iovec){arg, sizeof hdr};
		fuse_reply_ioctl_retry(req, iv_in, 1, NULL, 0);
		return;
	}
	memcpy(&hdr, in, sizeof hdr);
	if (hdr.nmsgs == 0 || hdr.nmsgs > I2C_RDWR_IOCTL_MAX_MSGS) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	size_t msgs_size = hdr.nmsgs * sizeof(struct i2c_msg);
	if (in_size < sizeof hdr + msgs_size) { /* stage 2: fetch the messages */
		iv_in[0] = (struct iovec){arg, sizeof hdr};
		iv_in[1] = (struct iovec){hdr.msgs, msgs_size};
		fuse_reply_ioctl_retry(req, iv_in, 2, NULL, 0);
		return;
	}
	struct i2c_msg msgs[I2C_RDWR_IOCTL_MAX_MSGS];
	memcpy(msgs, (const char *)in + sizeof hdr, msgs_size);
	size_t wsum = 0, rsum = 0;
	int nin = 2, nout = 0;
	iv_in[0] = (struct iovec){arg, sizeof hdr};
	iv_in[1] = (struct iovec){hdr.msgs, msgs_size};
	for (unsigned i = 0; i < hdr.nmsgs; i++) {
		if (msgs[i].len > 8192) {
			fuse_reply_err(req, EINVAL);
			return;
		}
		if (msgs[i].flags & I2C_M_RD) {
			rsum += msgs[i].len;
			iv_out[nout++] = (struct iovec){msgs[i].buf, msgs[i].len};
		} else {
			wsum += msgs[i].len;
			iv_in[nin++] = (struct iovec){msgs[i].buf, msgs[i].len};
		}
	}
	int have_data = in_size == sizeof hdr + msgs_size + wsum && out_size == rsum;
	if ((wsum || rsum) && !(have_data && (out_size > 0 || in_size > sizeof hdr + msgs_size))) {
		/* stage 3: fetch what is written, make room for what is read */
		fuse_reply_ioctl_retry(req, iv_in, nin, iv_out, nout);
		return;
	}
	/* stage 4: run the messages in order */
	const uint8_t *w = (const uint8_t *)in + sizeof hdr + msgs_size;
	uint8_t *out = calloc(1, rsum ? rsum : 1), *o = out;
	for (unsigned i = 0; i < hdr.nmsgs; i++) {
		int r;
		if (msgs[i].flags & I2C_M_RD) {
			r = xfer_read(msgs[i].addr, o, msgs[i].len);
			o += msgs[i].len;
		} else {
			r = xfer_write(msgs[i].addr, w, msgs[i].len);
			w += msgs[i].len;
		}
		if (r < 0) {
			free(out);
			fuse_reply_err(req, -r);
			return;
		}
	}
	fuse_reply_ioctl(req, (int)hdr.nmsgs, out, rsum);
	free(out);
}

static void smbus(fuse_req_t req, struct client *cl, void *arg, const void *in, size_t in_size, size_t out_size)
{
	struct i2c_smbus_ioctl_data hdr;
	union i2c_smbus_data data;
	struct iovec iv_in[2], iv_out[1];
	if (in_size < sizeof hdr) {
		iv_in[0] = (struct iovec){arg, sizeof hdr};
		fuse_reply_ioctl_retry(req, iv_in, 1, NULL, 0);
		return;
	}
	memcpy(&hdr, in, sizeof hdr);
	int reads = hdr.read_write == I2C_SMBUS_READ && hdr.size != I2C_SMBUS_QUICK;
	int writes_data = hdr.read_write == I2C_SMBUS_WRITE && hdr.size != I2C_SMBUS_QUICK && hdr.size != I2C_SMBUS_BYTE;
	size_t need_in = sizeof hdr + (writes_data || hdr.size == I2C_SMBUS_I2C_BLOCK_DATA ? sizeof data : 0);
	size_t need_out = reads ? sizeof data : 0;
	if (in_size < need_in || out_size < need_out) {
		int n = 1;
		iv_in[0] = (struct iovec){arg, sizeof hdr};
		if (need_in > sizeof hdr)
			iv_in[n++] = (struct iovec){hdr.data, sizeof data};
		iv_out[0] = (struct iovec){hdr.data, sizeof data};
		fuse_reply_ioctl_retry(req, iv_in, n, iv_out, need_out ? 1 : 0);
		return;
	}
	if (need_in > sizeof hdr)
		memcpy(&data, (const char *)in + sizeof hdr, sizeof data);
	uint8_t b[I2C_SMBUS_BLOCK_MAX + 2];
	int r = 0;
	switch (hdr.size) {
	case I2C_SMBUS_QUICK:
		r = find(cl->addr) ? 0 : -EREMOTEIO;
		break;
	case I2C_SMBUS_BYTE:
		if (hdr.read_write == I2C_SMBUS_READ) {
			r = xfer_read(cl->addr, b, 1);
			data.byte = b[0];
		} else {
			r = xfer_write(cl->addr, &hdr.command, 1);
		}
		break;
	case I2C_SMBUS_BYTE_DATA:
	case I2C_SMBUS_WORD_DATA: {
		size_t n = hdr.size == I2C_SMBUS_BYTE_DATA ? 1 : 2;
		if (hdr.read_write == I2C_SMBUS_READ) {
			r = xfer_write(cl->addr, &hdr.command, 1);
			if (!r)
				r = xfer_read(cl->addr, b, n);
			/* SMBus words go low byte first on the wire */
			data.word = n == 1 ? b[0] : (uint16_t)(b[0] | b[1] << 8);
		} else {
			b[0] = hdr.command;
			b[1] = data.word & 0xff;
			b[2] = data.word >> 8;
			r = xfer_write(cl->addr, b, n + 1);
		}
		break;
	}
	case I2C_SMBUS_I2C_BLOCK_DATA: {
		size_t n = data.block[0] > I2C_SMBUS_BLOCK_MAX ? I2C_SMBUS_BLOCK_MAX : data.block[0];
		if (hdr.read_write == I2C_SMBUS_READ) {
			r = xfer_write(cl->addr, &hdr.command, 1);
			if (!r)
				r = xfer_read(cl->addr, &data.block[1], n);
		} else {
			b[0] = hdr.command;
			memcpy(b + 1, &data.block[1], n);
			r = xfer_write(cl->addr, b, n + 1);
		}
		break;
	}
	default:
		r = -EOPNOTSUPP;
	}
	if (r < 0)
		fuse_reply_err(req, -r);
	else
		fuse_reply_ioctl(req, 0, reads ? &data : NULL, reads ? sizeof data : 0);
}

static void sim_ioctl(fuse_req_t req, int cmd, void *arg, struct fuse_file_info *fi, unsigned flags,
		      const void *in, size_t in_size, size_t out_size)
{
	(void)flags;
	struct client *cl = (void *)(uintptr_t)fi->fh;
	unsigned long value = (unsigned long)(uintptr_t)arg;
	switch ((unsigned)cmd) {
	case I2C_FUNCS: {
		unsigned long funcs = I2C_FUNC_I2C | I2C_FUNC_SMBUS_EMUL;
		if (out_size < sizeof funcs) {
			struct iovec iv = {arg, sizeof funcs};
			fuse_reply_ioctl_retry(req, NULL, 0, &iv, 1);
			return;
		}
		fuse_reply_ioctl(req, 0, &funcs, sizeof funcs);
		return;
	}
	case I2C_SLAVE:
	case I2C_SLAVE_FORCE:
		if (value > 0x7f) {
			fuse_reply_err(req, EINVAL);
			return;
		}
		cl->addr = (unsigned)value;
		fuse_reply_ioctl(req, 0, NULL, 0);
		return;
	case I2C_TENBIT:
		fuse_reply_ioctl(req, value ? -1 : 0, NULL, 0);
		return;
	case I2C_PEC:
	case I2C_RETRIES:
	case I2C_TIMEOUT:
		fuse_reply_ioctl(req, 0, NULL, 0);
		return;
	case I2C_RDWR:
		rdwr(req, arg, in, in_size, out_size);
		return;
	case I2C_SMBUS:
		smbus(req, cl, arg, in, in_size, out_size);
		return;
	default:
		fuse_reply_err(req, ENOTTY);
	}
}

static const struct cuse_lowlevel_ops ops = {
	.open = sim_open,
	.release = sim_release,
	.read = sim_read,
	.write = sim_write,
	.ioctl = sim_ioctl,
};

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: i2c-sim DEVNAME DIR CHIP... (CHIP: grove@0x04, ads1115@0x48, bh1750@0x23)\n");
		return 2;
	}
	dir = argv[2];
	int i = 3;
	for (; i < argc && strcmp(argv[i], "--"); i++) {
		char name[16];
		unsigned addr;
		if (nchips == MAX_CHIPS || sscanf(argv[i], "%15[a-z0-9]@%i", name, &addr) != 2 || addr > 0x7f) {
			fprintf(stderr, "i2c-sim: bad chip %s\n", argv[i]);
			return 2;
		}
		struct chip *c = &chips[nchips++];
		memset(c, 0, sizeof *c);
		c->addr = (uint8_t)addr;
		c->mtreg = 69;
		c->config = 0x8583;
		c->lo = 0x8000;
		c->hi = 0x7fff;
		if (!strcmp(name, "grove"))
			c->kind = GROVE;
		else if (!strcmp(name, "ads1115"))
			c->kind = ADS1115;
		else if (!strcmp(name, "bh1750"))
			c->kind = BH1750;
		else {
			fprintf(stderr, "i2c-sim: unknown chip %s\n", name);
			return 2;
		}
	}
	char devname[128];
	snprintf(devname, sizeof devname, "DEVNAME=%s", argv[1]);
	const char *info[] = {devname};
	struct cuse_info ci = {.dev_info_argc = 1, .dev_info_argv = info, .flags = CUSE_UNRESTRICTED_IOCTL};
	/* FUSE options after "--"; foreground and single-threaded by default */
	char *fargv[16] = {argv[0], "-f", "-s"};
	int fargc = 3;
	for (i++; i < argc && fargc < 15; i++)
		fargv[fargc++] = argv[i];
	return cuse_lowlevel_main(fargc, fargv, &ci, &ops, NULL);
}
